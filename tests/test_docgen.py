"""Generated reference pages (python -m mrivq.docgen): fresh, the same on every terminal, and
the example config is exactly the defaults."""

from pathlib import Path

import pytest

from mrivq import docgen
from mrivq.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return docgen.generated()


@pytest.mark.parametrize("path", [docgen.CONFIG_PAGE, docgen.EXAMPLE_CONFIG, docgen.CLI_PAGE])
def test_the_committed_page_is_what_the_code_gives_now(path, pages):
    committed = (REPO / path).read_text(encoding="utf-8")
    assert committed == pages[path], f"{path} is out of date: run python -m mrivq.docgen"


def test_the_pages_do_not_depend_on_the_terminal_width(monkeypatch, pages):
    for columns in ("40", "400"):
        monkeypatch.setenv("COLUMNS", columns)
        assert docgen.generated() == pages


def test_the_example_config_loads_to_exactly_the_default_config():
    loaded, defaults = load_config(REPO / docgen.EXAMPLE_CONFIG), Config()
    for name in Config.model_fields:  # sections compared whole, model.preset (not dumped) included
        assert getattr(loaded, name) == getattr(defaults, name), name


def test_every_config_key_has_a_description():
    for section in (Config, *(cls for _, cls in docgen.sections())):
        for key, field in section.model_fields.items():
            assert field.description and field.description.strip(), f"{section.__name__}.{key}"


def test_every_key_is_in_the_pages(pages):
    """Every key of every section, and of the sections inside a section (prior.passes), has its row
    and its line in the example config."""
    for name, section in docgen.sections():
        for key, field in section.model_fields.items():
            inner = docgen._subsection(field)
            for sub in inner.model_fields if inner else [None]:
                assert (f"`{name}.{key}.{sub}`" if sub else f"`{name}.{key}`") in pages[docgen.CONFIG_PAGE]
                assert (f"\n    {sub}: " if sub else f"\n  {key}: ") in pages[docgen.EXAMPLE_CONFIG]
    assert "`--top-p P` | `0.8` |" in pages[docgen.CLI_PAGE]


def test_check_names_the_stale_file_and_writing_freshens_it(tmp_path, capsys):
    (tmp_path / "src/mrivq").mkdir(parents=True)
    (tmp_path / "src/mrivq/config.py").touch()  # what marks the repository root
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / docgen.CLI_PAGE).write_text("# Command-line reference\n")
    capsys.readouterr()
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"{docgen.CLI_PAGE} is out of date: run python -m mrivq.docgen\n"
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
