"""run_report on run directories in the layout of docs/outputs.md: complete, partial,
broken and rerun (S3 and jobs/report.py: tests/integration/test_report_browser.py)."""

import html.parser
import io
import os
import re
import warnings

import matplotlib.image as mpimg
import pytest

from rayscreen.config import config_from_dict
from rayscreen.report import run_report
from rayscreen.report.example import write_example_run



class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.sections, self._text = [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs["src"])
        if tag == "section":
            self._current = attrs["id"]
            self.sections[self._current] = ""

    def handle_data(self, data):
        if self.sections:
            self.sections[self._current] += data


def parse(path):
    p = _Page()
    with open(path) as f:
        p.feed(f.read())
    return p


@pytest.fixture(autouse=True)
def _quiet_zarr_warnings():
    # the example stores use fixed-length strings, which zarr 3 flags as unstable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = write_example_run(out)
        path = run_report(config, progress=False)
    return config, path


def test_full_report_links_every_figure_and_each_is_a_png(full_run):
    config, path = full_run
    assert path == os.path.join(os.path.abspath(config.output), "report", "index.html")
    page = parse(path)
    assert len(page.imgs) >= 10
    figures_dir = os.path.join(os.path.dirname(path), "figures")
    assert sorted(os.path.basename(s) for s in page.imgs) == sorted(os.listdir(figures_dir))
    for src in page.imgs:
        assert not os.path.isabs(src) and "://" not in src and src.startswith("figures/")
        with open(os.path.join(os.path.dirname(path), src), "rb") as f:
            data = f.read()
        h, w, _ = mpimg.imread(io.BytesIO(data), format="png").shape
        assert h > 50 and w > 50
    assert set(page.sections) == {"stages", "training", "plate-maps", "top-scoring-fields", "profiles",
                                  "moa-evaluation", "qc"}
    assert "not run" not in page.sections["stages"]
    assert "could not render" not in "".join(page.sections.values())


def test_full_report_known_answers(full_run):
    config, path = full_run
    page = parse(path)
    names = {os.path.basename(s) for s in page.imgs}
    assert {"plate_P1.png", "plate_P2.png", "training_curves.png", "nsc_confusion.png", "qc_per_plate.png",
            "qc_examples.png", "profiles_pca_MOA.png", "profiles_pca_Compound.png"} <= names
    # scores 0.1..0.8 over wells, field f scores well - 0.05 f, P2/B01 field 1 QC-flagged:
    # the best three fields are P2/B02 f0 (0.8), P2/B02 f1 (0.75), P2/B01 f0 (0.7).
    tops = sorted(n for n in names if n.startswith("top_"))
    assert tops == ["top_01_P2_B02_0.png", "top_02_P2_B02_1.png", "top_03_P2_B01_0.png"]
    top = page.sections["top-scoring-fields"]
    assert "0.75" in top and "0.7" in top
    qc = page.sections["qc"]
    assert re.search(r"P1\s*8\s*0\s*0", qc) and re.search(r"P2\s*8\s*1\s*0.125", qc), qc
    ev = page.sections["moa-evaluation"]
    assert "0.75" in ev and "tubulin" in ev and "B02" in ev  # nsc, per-MOA table, hits
    assert "C07" in ev and "5.5" in ev and "0.61" in ev and "0.47" in ev  # score hits, Z' of distance and score


def test_report_of_a_run_with_no_outputs_says_which_stages_have_not_run(tmp_path):
    config = config_from_dict({"plates": [str(tmp_path / "none.zarr")], "output": str(tmp_path / "out")})
    path = run_report(config, progress=False)
    page = parse(path)
    assert page.imgs == []
    stages = page.sections["stages"]
    for stage in ("train", "infer", "profile", "aggregate", "evaluate"):
        assert stage in stages
    assert "Stages that have not run" in stages and "train, infer, profile, aggregate, evaluate" in stages
    assert "train has not run" in page.sections["training"]
    assert "QC has not run" in page.sections["qc"]


def test_partial_run_renders_what_exists_and_qc_falls_back_to_field_status(tmp_path):
    config = write_example_run(str(tmp_path / "out"), stages=("infer",))
    page = parse(run_report(config, progress=False))
    names = {os.path.basename(s) for s in page.imgs}
    assert "plate_P1.png" in names and "training_curves.png" not in names and "nsc_confusion.png" not in names
    assert "Stages that have not run (their sections are empty): train, profile, aggregate, evaluate." \
        in page.sections["stages"]
    assert "field_status == 3" in page.sections["qc"] and "qc_per_plate.png" in names
    # profiles come from tables/ when there, else profiles.zarr; here neither
    assert "aggregate and profile have not run" in page.sections["profiles"]


def test_profiles_fall_back_to_the_profile_store(tmp_path):
    config = write_example_run(str(tmp_path / "out"), stages=("profile",))
    page = parse(run_report(config, progress=False))
    assert "profiles.zarr well_profile" in page.sections["profiles"]
    assert any("profiles_pca_MOA" in s for s in page.imgs)


def test_an_unreadable_output_costs_only_its_section(tmp_path, caplog):
    config = write_example_run(str(tmp_path / "out"), stages=("train", "evaluate"))
    with open(os.path.join(config.output, "evaluation", "evaluation.json"), "w") as f:
        f.write("{not json")
    page = parse(run_report(config, progress=False))
    assert "could not render this section" in page.sections["moa-evaluation"]
    assert "JSONDecodeError" in page.sections["moa-evaluation"]
    assert any("training_curves" in s for s in page.imgs)
    assert "MOA evaluation" in caplog.text


def test_missing_raw_plates_are_reported_not_fatal(tmp_path):
    config = write_example_run(str(tmp_path / "out"), stages=("infer",))
    config = config.replace(plates=[str(tmp_path / "elsewhere" / "P9.zarr")])
    page = parse(run_report(config, progress=False))
    top = page.sections["top-scoring-fields"]
    assert "plate 'P2' is not among the config's plates" in top or "cannot open the config's plates" in top
    assert any("top_01_P2_B02_0" in s for s in page.imgs)  # saliency alone still shown


def test_rerun_removes_figures_of_the_previous_report(tmp_path):
    config = write_example_run(str(tmp_path / "out"), stages=("train", "infer"))
    first = run_report(config, progress=False)
    figures = os.path.join(os.path.dirname(first), "figures")
    assert "plate_P1.png" in os.listdir(figures)
    import shutil

    shutil.rmtree(os.path.join(config.output, "results.zarr"))
    run_report(config, progress=False)
    assert sorted(os.listdir(figures)) == ["training_curves.png"]


def test_a_plate_glob_matching_nothing_is_an_error_and_writes_no_report(tmp_path, capsys):
    # as in every other stage (docs/cluster.md): the report opens plates only for figures, so
    # without this check an empty glob gave an empty report and exit 0
    from rayscreen.cli import main
    from rayscreen.config import ConfigError

    nothing = str(tmp_path / "nope" / "*.zarr")
    config = config_from_dict({"plates": [nothing], "output": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"plates: plate glob '.*nope/\*\.zarr' matches nothing"):
        run_report(config, progress=False)
    assert not os.path.exists(os.path.join(config.output, "report"))

    path = tmp_path / "screen.yaml"
    path.write_text(f"plates: ['{nothing}']\noutput: {tmp_path / 'out'}\n")
    assert main(["--quiet", "report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayscreen report: error: plates: plate glob") and "Traceback" not in err
    assert not os.path.exists(os.path.join(config.output, "report"))
    assert not os.path.exists(os.path.join(config.output, "stages", "report.json"))


def test_run_tables_keep_plate_names_that_look_like_numbers(tmp_path):
    import pandas as pd

    from rayscreen.report.run import RunOutputs

    (tmp_path / "tables").mkdir()
    pd.DataFrame({"Metadata_Plate": ["001"], "Metadata_Well": ["A01"], "Metadata_Field": ["0"],
                  "Metadata_QC_Abnormal": [True]}).to_csv(tmp_path / "tables" / "qc.csv", index=False)
    table = RunOutputs(str(tmp_path)).table("tables/qc.csv")
    assert table["Metadata_Plate"].tolist() == ["001"] and table["Metadata_Field"].tolist() == ["0"]
