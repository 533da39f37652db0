"""Settings declared once: the field's metadata drives the environment, `env()`, the CLI flags and the docs."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
from epd.core.config import MOONCAKE_BIND_ENV, SettingError, Settings, check_mooncake_env, export_mooncake_env
from epd.ops.cli import _settings, parser

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_env_round_trips_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    changed = Settings(
        port=9123,
        max_deliver=7,
        trace_sample_ratio=0.25,
        tracing=False,
        inline_encode=False,
        topology="e-pd",
        api_keys="a,b",
        kv_cache_mb=64.5,
        model=Path("/tmp/some-model"),
    )
    env = changed.env()
    assert len(env) == len(dataclasses.fields(Settings))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == changed  # every variable written is read back to the same value


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("EPD_PORT", "abc", "EPD_PORT='abc' is not a valid int"),
        ("EPD_KV_CACHE_MB", "lots", "EPD_KV_CACHE_MB='lots' is not a valid float"),
        ("EPD_TRACING", "maybe", "EPD_TRACING='maybe' is not on or off"),
        ("EPD_INLINE_ENCODE", "sometimes", "EPD_INLINE_ENCODE='sometimes' is not fallback or off"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingError, match=re.escape(message)):
        Settings()


def test_flags_come_from_the_settings_and_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPD_PORT", "8100")
    monkeypatch.setenv("EPD_DEVICE", "cpu")
    args = parser().parse_args(["worker", "decode", "--port", "8200", "--dtype", "bfloat16", "--topology", "epd"])
    s = _settings(args)
    assert (s.port, s.dtype, s.topology, s.device) == (8200, "bfloat16", "epd", "cpu")
    flags = {f.name for f in Settings.flags()}
    for command in (["worker", "decode"], ["gateway"], ["up"]):
        help_text = parser().parse_known_args(command)[0]
        assert flags <= set(vars(help_text))  # every flagged setting is an option of each command
    with pytest.raises(SystemExit):
        parser().parse_args(["gateway", "--dtype", "int3"])  # choices come from the setting too


def test_the_readme_documents_every_variable() -> None:
    rows = re.findall(r"^\| (`EPD_.*?) \|", README.read_text(), re.M)  # the configuration table's first column
    documented = {name for row in rows for name in re.findall(r"`(EPD_[A-Z_]+)`", row)}
    declared = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    assert declared - documented == set()


def test_each_role_runs_the_engine_it_has() -> None:
    """`--engine vllm` reaches the roles with a vLLM path (encode, pd, epd); prefill and decode stay on epd's;
    `--encode-engine` sets the encoders' apart."""
    vllm = Settings(engine="vllm")
    assert [vllm.engine_for(r) for r in ("encode", "prefill", "decode", "pd", "epd")] == [
        "vllm",
        "epd",
        "epd",
        "vllm",
        "vllm",
    ]
    assert Settings(engine="vllm", encode_engine="epd").engine_for("encode") == "epd"
    assert Settings(encode_engine="vllm").engine_for("encode") == "vllm"
    assert Settings(encode_engine="vllm").engine_for("pd") == "epd"
    with pytest.raises(ValueError, match="'tgi'"):
        Settings(encode_engine="tgi")


def test_a_process_advertises_its_own_mooncake_address_not_an_inherited_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mooncake reads its bind address from the environment only: the process's entry sets it from its settings,
    over whatever it inherited, and a Mooncake client refuses to start on another one."""
    settings = Settings(bind_host="127.0.0.3")
    monkeypatch.setenv(MOONCAKE_BIND_ENV, "127.0.0.1")  # its launcher's
    with pytest.raises(ValueError, match=r"'127.0.0.1', not this process's address '127.0.0.3'"):
        check_mooncake_env(settings)
    export_mooncake_env(settings)
    assert os.environ[MOONCAKE_BIND_ENV] == "127.0.0.3"
    check_mooncake_env(settings)
    export_mooncake_env(Settings(bind_host="0.0.0.0"))  # any interface: the address peers can reach
    assert os.environ[MOONCAKE_BIND_ENV] == Settings(bind_host="0.0.0.0").reachable_host
