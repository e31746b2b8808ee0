"""redact / drop_masked: credentials masked by whole key name, settings kept."""

import pytest

from rayscreen.store.uri import MASK, drop_masked, redact

CREDENTIALS = ["key", "secret", "token", "password", "passwd", "passphrase", "credential", "credentials",
               "client_secret", "secret_key", "access_key", "account_key", "private_key", "pkey",
               "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "session_token", "sas_token",
               "refresh_token", "connection_string", "sas", "signature", "auth", "basic_auth",
               "Authorization", "Proxy-Authorization", "X-Amz-Security-Token", "x-api-key", "Cookie",
               "accessKeyId", "secretAccessKey", "sessionToken", "SecretKey", "clientSecret", "sasToken",
               "apikey", "authtoken", "dbpassword", "oauth"]

SETTINGS = ["signature_version", "signatureVersion", "key_prefix", "sse_kms_key_id", "SSEKMSKeyId", "max_keys",
            "author", "tokenizer", "auth_type", "region_name", "endpoint_url", "tenant_id", "account_name"]


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credentials_are_masked_by_name(name):
    masked = redact({name: "s3cr3t", "client_kwargs": {name: "s3cr3t"}, "headers": [{name: "s3cr3t"}]})
    assert masked == {name: MASK, "client_kwargs": {name: MASK}, "headers": [{name: MASK}]}
    assert "s3cr3t" not in repr(masked)


@pytest.mark.parametrize("name", SETTINGS)
def test_settings_whose_names_contain_a_credential_word_are_kept(name):
    """A substring test masked these ('signature_version' holds 'signature', 'key_prefix' 'key',
    'author' 'auth'); drop_masked then left them out of a re-run of the recorded config."""
    options = {name: "v", "config_kwargs": {name: "v"}}
    assert redact(options) == options
    assert drop_masked(redact(options)) == (options, [])


def test_a_recorded_s3_config_keeps_signature_version_and_loses_only_the_keys():
    """The reviewer's case: storage_options.config_kwargs.signature_version became '***' and was
    dropped on a re-run, which then signed with another version."""
    options = {"key": "AKIAFAKE", "secret": "shh", "endpoint_url": "http://127.0.0.1:9",
               "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
               "client_kwargs": {"aws_session_token": "tok", "region_name": "eu-west-1"}}
    recorded = redact(options)
    assert recorded["config_kwargs"] == {"signature_version": "s3v4", "s3": {"addressing_style": "path"}}
    again, dropped = drop_masked(recorded)
    assert again == {"endpoint_url": "http://127.0.0.1:9",
                     "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
                     "client_kwargs": {"region_name": "eu-west-1"}}
    assert dropped == ["storage_options.key", "storage_options.secret", "storage_options.client_kwargs.aws_session_token"]


def test_gcsfs_token_modes_and_nulls_are_shown():
    assert redact({"token": "google_default", "key": None}) == {"token": "google_default", "key": None}
    assert redact({"token": {"client_secret": "x", "refresh_token": "y"}}) == {"token": MASK}


def test_a_password_inside_a_url_is_masked_and_the_url_dropped_on_reuse():
    from rayscreen.store.uri import drop_masked

    options = {"endpoint_url": "http://minio:s3cr3t@host:9000", "client_kwargs": {"region_name": "x"}}
    shown = redact(options)
    assert shown["endpoint_url"] == "http://minio:***@host:9000" and "s3cr3t" not in str(shown)
    assert redact({"endpoint_url": "http://host:9000"})["endpoint_url"] == "http://host:9000"
    kept, dropped = drop_masked(shown)
    assert dropped == ["storage_options.endpoint_url"] and kept == {"client_kwargs": {"region_name": "x"}}
