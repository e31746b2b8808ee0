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


PLURALS = ["secrets", "tokens", "passwords", "api_keys", "cookies", "keys", "apiKeys", "Cookies", "credentials",
           "access_key_ids", "client_secrets", "auth_tokens"]


@pytest.mark.parametrize("name", PLURALS)
def test_plural_credential_names_are_masked(name):
    """A list or dict of credentials under a plural name ('api_keys', 'cookies'): the old
    substring rule masked them; the name's end must too."""
    masked = redact({name: ["s3cr3t", "other"], "client_kwargs": {name: {"a": "s3cr3t"}}})
    assert masked == {name: MASK, "client_kwargs": {name: MASK}} and "s3cr3t" not in repr(masked)


@pytest.mark.parametrize("name", ["max_keys", "num_tokens", "authors", "tokenizers", "statuses", "addresses"])
def test_plurals_that_are_not_credentials_are_kept(name):
    options = {name: 5}
    assert redact(options) == options and drop_masked(options) == (options, [])


@pytest.mark.parametrize("url, shown", [
    ("http://user:pw@host:9000", "http://user:***@host:9000"),
    # an '@' in the password: masked to the last '@' of the authority, not the first
    ("http://user:p@ss@host/x", "http://user:***@host/x"),
    ("s3://k:a@b@c@bucket/p?x=y@z", "s3://k:***@bucket/p?x=y@z"),
    # a '/', '?' or '#' unencoded in the password ends the authority for every URL parser
    # (host 'u', port 'a/b'...): masked to the last '@' of the URL rather than shown
    ("http://u:a/b@host", "http://u:***@host"),
    ("http://u:a?b@host:9000", "http://u:***@host:9000"),
    ("http://u:a#b@host", "http://u:***@host"),
    # no password: kept
    ("http://host:9000", "http://host:9000"),
    ("http://user@host:9000/x", "http://user@host:9000/x"),
    ("http://user:@host", "http://user:@host"),
    ("http://host:9000/p?mail=a@b", "http://host:9000/p?mail=a@b"),  # a port, then an '@' in the query
    ("http://u@host:9000/x@y", "http://u@host:9000/x@y"),
    # not a URL: kept
    ("user:pw@host", "user:pw@host"),
    ("a:b@c", "a:b@c"),
    # a URL inside other text, and IPv6 hosts
    ("proxy http://u:pw@h:1/x then s3://k:s@b/p", "proxy http://u:***@h:1/x then s3://k:***@b/p"),
    ("http://u:pw@[::1]:9000/x", "http://u:***@[::1]:9000/x"),
    ("http://u:p@ss@[::1", "http://u:***@[::1"),  # urlsplit raises on this one
])
def test_url_passwords_are_masked_whole(url, shown):
    assert redact({"endpoint_url": url}) == {"endpoint_url": shown}
    masked = shown != url
    kept, dropped = drop_masked(redact({"endpoint_url": url, "region_name": "r"}))
    assert dropped == (["storage_options.endpoint_url"] if masked else [])
    assert kept == ({"region_name": "r"} if masked else {"endpoint_url": url, "region_name": "r"})


def test_url_passwords_are_read_as_urlsplit_reads_them():
    from urllib.parse import urlsplit

    for url in ("http://user:pw@host:9000", "http://user:p@ss@host/x", "https://a@b:c:d@host/p?q=1@2#f@g",
                "http://:pw@host"):
        password = urlsplit(url).password
        shown = redact({"u": url})["u"]
        assert password and password not in shown.replace("***", "") and urlsplit(shown).password == MASK
        assert urlsplit(shown).hostname == urlsplit(url).hostname and urlsplit(shown).path == urlsplit(url).path


def test_a_password_with_a_slash_before_a_port_like_number_is_read_as_a_port():
    """'http://u:1234/5@host' is host u, port 1234, path /5@host to every parser and client:
    it is kept, like 'http://host:9000/p?mail=a@b' (encode a '/' in a password as %2F)."""
    assert redact({"e": "http://u:1234/5@host"}) == {"e": "http://u:1234/5@host"}
    assert redact({"e": "http://u:12%2F34@host"}) == {"e": "http://u:***@host"}


@pytest.mark.parametrize("url", ["http://[::1]:9000/bucket/a@b", "http://u@[::1]:9000/x@y"])
def test_an_ipv6_endpoint_with_an_at_sign_later_is_kept(url):
    from rayscreen.store.uri import mask_url_passwords

    assert mask_url_passwords(url) == url
    assert mask_url_passwords("http://user:pw@[::1]:9000/x") == "http://user:***@[::1]:9000/x"
