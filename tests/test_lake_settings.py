"""LAKE_* settings: where the lake is, read like the DB_* ones; a bad value is a ConfigError
naming the variable; the secret key never shows in a repr, a message or an error."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from orderbook_store.errors import ConfigError
from orderbook_store.files.lake_store import open_lake
from orderbook_store.settings import Settings

SECRET = "Lake-" + secrets.token_hex(10) + "/Secret+Key"
KEYS = {"lake_access_key_id": "DO00EXAMPLEKEYID", "lake_secret_access_key": SECRET}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LAKE_*/DB_* variables or .env from the developer's shell leak into these tests."""
    for name in list(os.environ):
        if name.startswith(("LAKE_", "DB_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_lake_variables_are_read_from_the_environment_and_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LAKE_URL", "s3://quotes-lake/futures")
    monkeypatch.setenv("LAKE_ENDPOINT_URL", "https://fra1.digitaloceanspaces.com")
    monkeypatch.setenv("LAKE_REGION", "fra1")
    monkeypatch.setenv("LAKE_ACCESS_KEY_ID", "DO00EXAMPLEKEYID")
    monkeypatch.setenv("LAKE_SECRET_ACCESS_KEY", SECRET)
    settings = Settings()
    assert (settings.lake_url, settings.lake_endpoint_url, settings.lake_region) == (
        "s3://quotes-lake/futures",
        "https://fra1.digitaloceanspaces.com",
        "fra1",
    )
    assert settings.lake_access_key_id == "DO00EXAMPLEKEYID"
    assert settings.lake_secret_access_key is not None
    assert settings.lake_secret_access_key.get_secret_value() == SECRET

    for name in list(os.environ):
        if name.startswith("LAKE_"):
            monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(f"LAKE_URL={tmp_path / 'lake'}\n")
    assert Settings().lake_url == str(tmp_path / "lake")


def test_no_lake_url_means_no_lake() -> None:
    assert open_lake(Settings()) is None
    assert open_lake(Settings(lake_url="  ")) is None


def test_a_spaces_lake_opens_without_contacting_the_store_and_hides_its_key() -> None:
    settings = Settings(
        lake_url="s3://quotes-lake/futures/",
        lake_endpoint_url="https://fra1.digitaloceanspaces.com",
        lake_region="fra1",
        **KEYS,
    )
    lake = open_lake(settings)
    assert lake is not None
    assert (lake.url, lake.root, lake.is_local) == (
        "s3://quotes-lake/futures",
        "quotes-lake/futures",
        False,
    )
    assert lake.path("exchange=x", "a.parquet") == "quotes-lake/futures/exchange=x/a.parquet"
    assert lake.filesystem.region == "fra1"
    for shown in (repr(settings), str(settings), repr(lake), str(lake), lake.url):
        assert SECRET not in shown
    assert "DO00EXAMPLEKEYID" not in repr(lake)


def test_a_local_lake_is_a_directory_made_on_open(tmp_path: Path) -> None:
    for url in (str(tmp_path / "a" / "lake"), f"file://{tmp_path}/b/lake"):
        lake = open_lake(Settings(lake_url=url))
        assert lake is not None and lake.is_local and lake.url == url
        assert Path(lake.root).is_dir() and Path(lake.root).is_absolute()


@pytest.mark.parametrize(
    ("values", "variable", "shown"),
    [
        (
            {"lake_url": "ftp://files.example.com/lake"},
            "LAKE_URL",
            "'ftp://files.example.com/lake'",
        ),
        ({"lake_url": "gs://bucket/lake"}, "LAKE_URL", "'gs://bucket/lake'"),
        ({"lake_url": "s3:///no-bucket"}, "LAKE_URL", "'s3:///no-bucket'"),
        ({"lake_url": "s3://My_Bucket/lake"}, "LAKE_URL", "'s3://My_Bucket/lake'"),
        (
            {"lake_url": "s3://bucket/p", "lake_endpoint_url": "fra1.digitaloceanspaces.com"},
            "LAKE_ENDPOINT_URL",
            "'fra1.digitaloceanspaces.com'",
        ),
        (
            {"lake_url": "s3://bucket/p", "lake_endpoint_url": "ftp://fra1.digitaloceanspaces.com"},
            "LAKE_ENDPOINT_URL",
            "'ftp://fra1.digitaloceanspaces.com'",
        ),
        (
            {"lake_url": "s3://bucket/p", "lake_access_key_id": "DO00EXAMPLEKEYID"},
            "LAKE_SECRET_ACCESS_KEY",
            "LAKE_ACCESS_KEY_ID",
        ),
        (
            {"lake_url": "s3://bucket/p", "lake_secret_access_key": SECRET},
            "LAKE_ACCESS_KEY_ID",
            "LAKE_SECRET_ACCESS_KEY",
        ),
    ],
)
def test_a_lake_setting_that_cannot_work_names_the_variable_and_its_value(
    values: dict[str, str], variable: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_lake(Settings(**values))
    message = str(info.value)
    assert variable in message and shown in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "url",
    [
        f"s3://DO00EXAMPLEKEYID:{SECRET}@bucket/prefix",
        f"ftp://user:{SECRET}@files.example.com/lake",
        f"s3://bucket/prefix?secret_key={SECRET}",
        f"s3://{SECRET.replace('/', '')}/prefix",
        "s3://DO00EXAMPLEKEYID:TopSecretKey/prefix",
    ],
)
def test_a_key_put_in_lake_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_lake(Settings(lake_url=url))
    assert "LAKE_URL" in str(info.value)
    assert SECRET not in str(info.value) and "TopSecretKey" not in str(info.value)


def test_an_invalid_secret_key_value_is_reported_hidden() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(lake_secret_access_key=12345678901234)  # type: ignore[arg-type]
    assert "LAKE_SECRET_ACCESS_KEY=(hidden)" in str(info.value)
    assert "12345678901234" not in str(info.value)
