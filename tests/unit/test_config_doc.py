"""The config reference (docs/config.md) and `rayscreen config`."""

import dataclasses
import os
import typing
from dataclasses import dataclass

from rayscreen.cli import main
from rayscreen.config import Config, load_config
from rayscreen.config_doc import config_reference, field_notes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_docs_config_md_is_the_generated_reference():
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        assert f.read() == config_reference(), "regenerate: rayscreen config --reference > docs/config.md"


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_key_has_a_row_with_its_default():
    text = config_reference()
    keys = list(_keys(Config))
    assert len(keys) > 100
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert '| `train.epochs` | int | `10` | total: a resumed run trains up to this many |' in text
    assert '| `plates` | list[str] | **required** |' in text


@dataclass
class _Example:
    a: int = 1  # trailing
    # above, line one
    # and line two
    b: str = "# not a comment"
    c: float = 0.5

    d: bool = True  # after a blank line


def test_field_notes_take_comments_beside_and_above_a_field_but_not_hashes_in_strings():
    assert field_notes(_Example) == {"a": "trailing", "b": "above, line one and line two", "c": "",
                                     "d": "after a blank line"}


def test_rayscreen_config_prints_the_full_config_with_secrets_masked(tmp_path, capsys):
    path = tmp_path / "screen.yaml"
    path.write_text("plates: [p.zarr]\noutput: out\nstorage_options:\n  endpoint_url: http://127.0.0.1:9000\n"
                    "  secret: s3cr3t-value\n")
    assert main(["config", str(path), "--set", "train.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t-value" not in printed and "endpoint_url: http://127.0.0.1:9000" in printed
    again = load_config(printed)
    assert again.train.epochs == 3 and again.train.augment.translate == 40.0  # defaults filled in
    assert again == load_config(str(path), overrides={"train.epochs": 3}).replace(
        storage_options={"endpoint_url": "http://127.0.0.1:9000"})  # the masked secret is left out
    assert main(["config"]) == 2
    assert "give a CONFIG.yaml" in capsys.readouterr().err
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference()
