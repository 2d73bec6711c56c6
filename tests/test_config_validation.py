"""Config validation (issue 10): every numeric field of every config rejects NaN, ±inf and
out-of-range values, from TOML and from Python, with one line naming the key, the value and
the valid range; and the TOML the init commands write loads back.

The fields are discovered from the dataclasses (``dataclasses.fields``), never hand-listed:
a new numeric field without a declared range fails here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import (
    Range,
    build,
    check_fields,
    dump_tables,
    field_range,
    numeric_kind,
    ranged,
    read_toml,
    to_plain,
)
from fedpref.model.config import AdapterSpec, ModelConfig
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.secagg import SecAggConfig, load_secagg_config
from fedpref.simulations.config import AuditConfig, SimConfig, load_sim_config
from fedpref.simulations.persona import ATTRIBUTES, CommunitySpec, PersonaConfig

BUDGET_FIELDS = {(FederationConfig, "max_epsilon_user"), (LocalConfig, "max_epsilon_sample")}
ONE_COMMUNITY = {"name": "all", "share": 1.0, "mean": [0.0] * len(ATTRIBUTES), "unsafe_affinity": 0.0}


def _walk(cls: type, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], type]]:
    """(TOML path, dataclass) of ``cls`` and every config dataclass below it."""
    out = [(path, cls)]
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out += _walk(hint, (*path, name))
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            out += _walk(typing.get_args(hint)[0], (*path, f"{name}[]"))  # an array of tables
    return out


CONFIGS = [(p, c) for p, c in _walk(SimConfig, ()) if p]  # every table of the simulation config
SERVER_AND_AGENT = [((), FederationConfig), ((), LocalConfig), ((), ModelConfig), ((), SecAggConfig)]


def _numeric(cls: type) -> list[tuple[str, bool, bool]]:
    """(field, integer, tuple) of every numeric field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f.name, *kind) for f in dataclasses.fields(cls) if (kind := numeric_kind(hints[f.name]))]


FIELDS = [(path, cls, name, integer, is_tuple)
          for path, cls in CONFIGS for name, integer, is_tuple in _numeric(cls)]


def _id(f: tuple) -> str:
    return f"{f[1].__name__}.{f[2]}"


def test_the_walk_finds_every_config_of_the_issue() -> None:
    found = {c for _, c in CONFIGS}
    assert {FederationConfig, LocalConfig, ModelConfig, AdapterSpec, SecAggConfig, PersonaConfig,
            CommunitySpec, AuditConfig}.issubset(found)
    assert len(FIELDS) >= 50  # guards the discovery itself (numeric_kind, the walk)


# ---- every field declares its range ---------------------------------------------------------
@pytest.mark.parametrize("f", FIELDS, ids=_id)
def test_every_numeric_field_declares_a_range(f: tuple) -> None:
    _, cls, name, integer, _ = f
    rng = field_range(next(x for x in dataclasses.fields(cls) if x.name == name))
    assert isinstance(rng, Range), f"{cls.__name__}.{name}: declare it with ranged(...)"
    if integer:  # integers are bounded above: no overflow, no exhausted memory
        assert rng.le is not None or rng.lt is not None, f"{cls.__name__}.{name} needs an upper bound"
    assert rng.inf == ((cls, name) in BUDGET_FIELDS)  # +inf only means "no budget"


def test_a_numeric_field_without_a_range_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Forgot:
        x: float = 1.0

        def __post_init__(self) -> None:
            check_fields(self, "forgot")

    with pytest.raises(TypeError, match=r"Forgot\.x: .*ranged\("):
        Forgot()


# ---- NaN and ±inf, from TOML text and from Python ---------------------------------------------
def _toml_text(path: tuple[str, ...], name: str, literal: str) -> str:
    """A whole simulation config whose ``path.name`` is the TOML literal ``literal``."""
    if path and path[-1].endswith("[]"):  # the persona's communities: one valid community
        table = ".".join((*path[:-1], path[-1][:-2]))
        lines = [f"[[{table}]]"] + [f"{k} = {json.dumps(v)}" for k, v in ONE_COMMUNITY.items() if k != name]
        return "\n".join(lines + [f"{name} = {literal}", ""])
    return f"[{'.'.join(path)}]\n{name} = {literal}\n"


def _literal(value: str, is_tuple: bool) -> str:
    return f"[{value}] " if is_tuple else value


def _assert_one_line_naming(err: ConfigError, key: str, value: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    assert f"{key} = {value}" in msg, msg
    assert "; use " in msg, msg  # and the fix: the valid range


BAD_TOML = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", '"nan"', '"-inf"']


@pytest.mark.parametrize("literal", BAD_TOML)
@pytest.mark.parametrize("f", FIELDS, ids=_id)
def test_toml_nan_and_inf_are_rejected_naming_the_key(tmp_path: Path, f: tuple, literal: str) -> None:
    path, cls, name, integer, is_tuple = f
    if (cls, name) in BUDGET_FIELDS and literal in ("inf", "+inf"):
        pytest.skip("inf = no budget (test_budgets_accept_inf)")
    cfg = tmp_path / "c.toml"
    cfg.write_text(_toml_text(path, name, _literal(literal, is_tuple)))
    assert isinstance(tomllib.loads(cfg.read_text()), dict)  # the literal itself is valid TOML
    with pytest.raises(ConfigError) as info:
        load_sim_config(cfg)
    key = f"{name}[0]" if is_tuple else name
    shown = {"+nan": "nan", "-nan": "nan", "+inf": "inf", '"nan"': "'nan'", '"-inf"': "'-inf'"}.get(literal, literal)
    _assert_one_line_naming(info.value, key, shown)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", None, True])
@pytest.mark.parametrize("f", FIELDS, ids=_id)
def test_python_nan_and_inf_are_rejected_naming_the_key(f: tuple, value: object) -> None:
    _, cls, name, _, is_tuple = f
    if (cls, name) in BUDGET_FIELDS and value == math.inf:
        pytest.skip("inf = no budget (test_budgets_accept_inf)")
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in ONE_COMMUNITY.items()} if cls is CommunitySpec else {}
    bad = (value, *[0.0] * (len(ATTRIBUTES) - 1)) if is_tuple else value
    with pytest.raises(ConfigError) as info:
        cls(**base | {name: bad})
    key = f"{name}[0]" if is_tuple else name
    shown = repr(value) if isinstance(value, (str, bool)) or value is None else str(value)
    _assert_one_line_naming(info.value, key, shown)


@pytest.mark.parametrize("literal", ["inf", "+inf", '"inf"'])
@pytest.mark.parametrize("cls, name", sorted(BUDGET_FIELDS, key=str))
def test_budgets_accept_inf(tmp_path: Path, cls: type, name: str, literal: str) -> None:
    table = "federation" if cls is FederationConfig else "local"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{table}]\n{name} = {literal}\n")
    assert getattr(getattr(load_sim_config(cfg), table), name) == math.inf
    assert getattr(cls(**{name: math.inf}), name) == math.inf
    assert getattr(cls(**{name: 10}), name) == 10


@pytest.mark.parametrize("toml_path, cls", SERVER_AND_AGENT + [(p, c) for p, c in CONFIGS if c is not CommunitySpec],
                         ids=lambda x: x.__name__ if isinstance(x, type) else ".".join(x))
def test_defaults_still_load(toml_path: tuple, cls: type) -> None:
    built = build(cls, {}, where="<defaults>")
    assert built == cls()
    check_fields(built, "x")  # the defaults are inside their own ranges


def test_the_shipped_configs_still_load() -> None:
    for toml in sorted((Path(__file__).parent.parent / "simulations" / "configs").glob("*.toml")):
        assert isinstance(load_sim_config(toml), SimConfig)


def test_the_server_and_the_device_loaders_check_their_tables(tmp_path: Path) -> None:
    from fedpref.server.app import load_server_settings

    cfg = tmp_path / "server.toml"
    cfg.write_text("[federation]\nclip_norm = nan\n")
    with pytest.raises(ConfigError, match=r"\[federation\]\.clip_norm = nan; use a finite number > 0, e\.g\. 1\.0$"):
        load_server_settings(str(cfg))
    cfg.write_text("[local]\ndp_noise_multiplier = nan\n")  # used to switch sample-level DP off
    with pytest.raises(ConfigError, match=r"\[local\]\.dp_noise_multiplier = nan; use a finite number ≥ 0"):
        load_server_settings(str(cfg))
    cfg.write_text("[model.adapter]\nalpha = inf\n")
    with pytest.raises(ConfigError, match=r"alpha = inf; use a finite number > 0"):
        load_server_settings(str(cfg))
    cfg.write_text("[secagg]\nreconstruction_fraction = -inf\n")
    with pytest.raises(ConfigError, match=r"reconstruction_fraction = -inf; use a number in \(0, 1\]"):
        load_secagg_config(str(cfg))


# ---- out of range ---------------------------------------------------------------------------
def _outside(rng: Range, integer: bool) -> list[float]:
    """Values just outside each bound of ``rng``."""
    out: list[float] = []
    for bound, step in ((rng.gt, 0), (rng.ge, -1), (rng.lt, 0), (rng.le, +1)):
        if bound is None:
            continue
        if step == 0:
            out.append(bound)
        elif integer:
            out.append(int(bound) + step)
        else:
            out.append(math.nextafter(bound, step * math.inf))
    return out


@pytest.mark.parametrize("f", [f for f in FIELDS if not f[4]], ids=_id)
def test_just_outside_every_declared_bound_is_rejected(f: tuple) -> None:
    _, cls, name, integer, _ = f
    rng = field_range(next(x for x in dataclasses.fields(cls) if x.name == name))
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in ONE_COMMUNITY.items()} if cls is CommunitySpec else {}
    values = _outside(rng, integer)
    assert values or not integer
    for v in values:
        with pytest.raises(ConfigError) as info:
            cls(**base | {name: v})
        assert f"{name} = {v!r}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (FederationConfig, {"client_sample_rate": 0.0},
     "federation.client_sample_rate = 0.0; use a number in (0, 1], e.g. 0.5"),
    (FederationConfig, {"client_sample_rate": 1.5}, "federation.client_sample_rate = 1.5; use a number in (0, 1]"),
    (FederationConfig, {"delta": 1.0}, "federation.delta = 1.0; use a number in (0, 1), e.g. 1e-05"),
    (FederationConfig, {"rounds": 10**9}, "federation.rounds = 1000000000; use an integer in [1, 100000], e.g. 10"),
    (FederationConfig, {"server_noise_multiplier": 0.0}, "user-level DP needs noise"),
    (FederationConfig, {"max_epsilon_user": 0.0}, "federation.max_epsilon_user = 0.0; use a number > 0, or inf"),
    (FederationConfig, {"rounds": 2.0}, "federation.rounds = 2.0; use an integer"),
    (LocalConfig, {"dp_noise_multiplier": -1.0}, "local.dp_noise_multiplier = -1.0; use a finite number ≥ 0"),
    (LocalConfig, {"batch_size": 0}, "local.batch_size = 0; use an integer in [1, 65536]"),
    (LocalConfig, {"dp_max_grad_norm": 0.0}, "local.dp_max_grad_norm = 0.0; use a finite number > 0"),
    (ModelConfig, {"max_length": 5}, "model.max_length = 5; use an integer in [8, 4096], e.g. 96"),
    (AdapterSpec, {"rank": 0}, "adapter.rank = 0; use an integer in [1, 4096]"),
    (PersonaConfig, {"users": 10**12}, "PersonaConfig.users = 1000000000000; use an integer in [1, 100000]"),
    (PersonaConfig, {"pairs_per_user": 10**12}, "PersonaConfig.pairs_per_user = 1000000000000; use an integer"),
    (SecAggConfig, {"modulus_range": 3 << 20}, "secagg.modulus_range = 3145728; use a power of 2"),
    (SecAggConfig, {"min_cohort": 1}, "SecAgg+ needs ≥ 2 nodes"),
])
def test_out_of_range_examples(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_out_of_range_from_toml_names_the_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text("[persona]\nusers = 100000000000\n")
    with pytest.raises(ConfigError) as info:
        load_sim_config(cfg)
    assert str(info.value) == f"{cfg}.persona.users = 100000000000; use an integer in [1, 100000], e.g. 40"
    cfg.write_text("[federation]\nrounds = 3.0\n")  # an integer field takes no float, not even a whole one
    with pytest.raises(ConfigError, match=r"federation\.rounds = 3\.0; use an integer in \[1, 100000\]"):
        load_sim_config(cfg)


def test_range_describe() -> None:
    assert Range(gt=0).describe(integer=False) == "a finite number > 0"
    assert Range(gt=0, le=1).describe(integer=False) == "a number in (0, 1]"
    assert Range(ge=1, le=10).describe(integer=True) == "an integer in [1, 10]"
    assert Range(gt=0, inf=True).describe(integer=False) == "a number > 0, or inf for no limit"
    assert Range().describe(integer=False) == "a finite number"
    with pytest.raises(TypeError):
        Range(gt=0, ge=0)
    assert not Range(le=1).accepts(10**400, integer=False)  # too large for a float


# ---- the TOML writer (tomli-w) ----------------------------------------------------------------
def test_dump_tables_round_trips_every_config_with_inf_as_a_string(tmp_path: Path) -> None:
    sim = SimConfig()
    assert sim.federation.max_epsilon_user == math.inf
    text = dump_tables(sim.to_dict())
    assert 'max_epsilon_user = "inf"' in text and 'max_epsilon_sample = "inf"' in text
    path = tmp_path / "sim.toml"
    path.write_text(text)
    assert build(SimConfig, read_toml(path), where=str(path)) == sim


def test_dump_tables_as_the_init_commands_use_it() -> None:
    """What ``fedpref-server init`` and ``fedpref-agent init`` write loads back with build."""
    fed = to_plain(FederationConfig()) | {"max_epsilon_user": 10.0, "report_eval_metrics": False}
    local = to_plain(LocalConfig()) | {"max_epsilon_sample": math.inf}  # a raw float inf, too
    model = to_plain(ModelConfig(backbone='/models/a "b"'))
    data = tomllib.loads(dump_tables({"server": {"address": "fl.example.org:9092"}, "model": model,
                                      "federation": fed, "local": local}))
    assert data["server"] == {"address": "fl.example.org:9092"}
    assert build(ModelConfig, data["model"], where="m") == ModelConfig(backbone='/models/a "b"')
    assert build(FederationConfig, data["federation"], where="f") == FederationConfig(
        max_epsilon_user=10.0, report_eval_metrics=False)
    assert build(LocalConfig, data["local"], where="l") == LocalConfig()


def test_dump_tables_refuses_nan() -> None:
    with pytest.raises(ValueError, match=r"federation\.clip_norm = nan"):
        dump_tables({"federation": {"clip_norm": math.nan}})


def test_ranged_fields_are_plain_dataclass_fields() -> None:
    @dataclass(frozen=True)
    class Demo:
        x: float = ranged(1.0, gt=0)

        def __post_init__(self) -> None:
            check_fields(self, "demo")

    assert Demo().x == 1.0 and dataclasses.replace(Demo(), x=2.0).x == 2.0
    with pytest.raises(ConfigError, match=r"^demo\.x = nan; use a finite number > 0, e\.g\. 1\.0$"):
        dataclasses.replace(Demo(), x=math.nan)


@pytest.mark.parametrize("fraction,min_cohort", [(0.5, 3), (0.51, 3), (0.6, 3), (0.62, 3), (0.51, 5)])
def test_secagg_thresholds_that_are_no_majority_are_refused(fraction, min_cohort):
    """Flower rounds the threshold (round(0.6 · 4) = 2 of 4 shares): every device would refuse the
    round (``secagg_guard``), so the config is refused first, naming the cohort size."""
    from fedpref.server.secagg import SecAggConfig, flower_shares, flower_threshold

    with pytest.raises(ConfigError, match=r"not a strict majority.*reconstruction_fraction >= 0.67"):
        SecAggConfig(reconstruction_fraction=fraction, min_cohort=min_cohort)
    ok = SecAggConfig(reconstruction_fraction=0.67, min_cohort=min_cohort)
    for n in range(min_cohort, 500):  # the default and every cohort size: a strict majority
        shares = flower_shares(ok.share_fraction, n)
        assert 2 * flower_threshold(ok.reconstruction_fraction, shares) > shares


@pytest.mark.parametrize("fraction", [1e-6, 1e-300, 0.0099])
def test_a_tiny_share_fraction_is_refused_at_once_in_both_config_paths(tmp_path: Path, fraction: float) -> None:
    """``cohort_without_majority`` searches ~(1/(2r−1)+2)/share_fraction cohort sizes: a valid but
    tiny share_fraction made config loading spin. The range starts at 0.01 (≤ ~50k sizes)."""
    import time

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[secagg]\nshare_fraction = {fraction!r}\n")
    for load in (load_secagg_config, load_sim_config):  # fedpref-server, fedpref-sim
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=r"share_fraction = .*; use a number in \[0\.01, 1\]") as info:
            load(str(cfg) if load is load_secagg_config else cfg)
        assert "\n" not in str(info.value) and time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()  # the slowest search the range allows: r just above 1/2, the smallest fraction
    SecAggConfig(share_fraction=0.01, reconstruction_fraction=0.5011, min_cohort=1000)
    assert time.perf_counter() - t0 < 1.0


def test_private_only_fits_take_their_own_batch_and_the_rounds_keep_local():
    """[methods] private_batch_size sets the batch of the simulation's private-only fits (local,
    finetuned, new users); 0 falls back to [local].batch_size, which the rounds always use."""
    from fedpref.simulations.config import MethodsConfig, load_sim_config
    from fedpref.simulations.runner import _local_cfg

    cfg = load_sim_config(Path(__file__).parents[1] / "simulations" / "configs" / "demo.toml")
    own = dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, private_batch_size=7))
    assert _local_cfg(own, 3, 0).batch_size == 7 and own.local.batch_size != 7
    fallback = dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, private_batch_size=0))
    assert _local_cfg(fallback, 3, 0).batch_size == cfg.local.batch_size
    with pytest.raises(ConfigError, match="private_batch_size"):
        MethodsConfig(private_batch_size=-1)


def test_the_scale_curve_changes_nothing_but_the_number_of_users():
    """scripts/scale_curve.sh compares scale-{40,200,1000}.toml at fixed pairs per user and fixed
    ε_user: every setting but [persona] users must be the same in the three configs."""
    from fedpref.simulations.config import load_sim_config

    root = Path(__file__).parents[1] / "simulations" / "configs"
    cfgs = {n: load_sim_config(root / f"scale-{n}.toml") for n in (40, 200, 1000)}
    plain = {n: dataclasses.replace(c, persona=dataclasses.replace(c.persona, users=1)) for n, c in cfgs.items()}
    assert plain[40] == plain[200] == plain[1000]
    assert [cfgs[n].persona.users for n in (40, 200, 1000)] == [50, 250, 1250]
    # the rounds are full-batch DP-SGD steps over every user's train pairs; the private fits are not
    c = cfgs[1000]
    train_pairs = round(c.persona.pairs_per_user * (1 - c.persona.test_fraction))
    assert c.local.batch_size >= train_pairs > c.methods.private_batch_size == c.personalize.batch_size > 0
