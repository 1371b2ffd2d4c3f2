from pathlib import Path

from orbion_common.config_docs import render
from orbion_common.settings import CommonSettings

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_configuration_doc_lists_every_setting_as_the_code_declares_it():
    assert DOC.read_text() == render(), "run: python -m orbion_common.config_docs > docs/configuration.md"


def test_every_common_setting_is_documented():
    missing = [name for name, field in CommonSettings.model_fields.items() if not field.description]
    assert missing == []
