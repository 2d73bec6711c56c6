"""The operator CLI for signing keys and safety policies: `fedpref-server keys ...` / `policy ...`.

Most tests run the installed console script in a subprocess, as an operator would from a
shell: keys init -> policy build -> policy sign -> policy verify, and every documented failure
(tampering, wrong passphrase, missing key file, expired policy, rotation). A few fast cases
use typer's CliRunner in process (the passphrase prompt, an interrupted rotation).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpref.common.exit_codes import EXIT_CODE_HELP, ExitCode, exit_code_for
from fedpref.safety_policy import (
    ExpiredPolicyError,
    ExpiredRootError,
    KeyFileError,
    MalformedRootError,
    RevokedKeyError,
    RollbackError,
    SignatureThresholdError,
    WrongPassphraseError,
    load_root,
    update_root,
)
from fedpref.server import keys, policy_cli
from fedpref.server.cli import app

PASS = "correct horse battery staple"


# --- helpers ----------------------------------------------------------------------------------


def _server_command() -> list[str]:
    script = Path(sys.executable).parent / "fedpref-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedpref.server.cli"]


def _env(passphrase: str | None = PASS) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (policy_cli.PASSPHRASE_ENV, policy_cli.HOME_ENV)}
    if passphrase is not None:
        env[policy_cli.PASSPHRASE_ENV] = passphrase
    return env


def run(*args: object, cwd: Path, passphrase: str | None = PASS, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*_server_command(), *map(str, args)], cwd=cwd, env=_env(passphrase),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess, code: ExitCode) -> str:
    assert result.returncode == int(code), (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def in_days(days: float) -> str:
    return iso(now_utc() + timedelta(days=days))


def keys_init(tmp: Path, home: str = "ops", *extra: object) -> Path:
    ok(run("keys", "init", "--home", home, *extra, cwd=tmp))
    return tmp / home / "keys"


def sign(tmp: Path, bundle: Path, out: str, *, version: int = 1, home: str = "ops",
         expires: str | None = None, passphrase: str | None = PASS) -> subprocess.CompletedProcess:
    return run("policy", "sign", bundle, "--home", home, "--version", version,
               "--expires", expires or in_days(30), "--out", out, cwd=tmp, passphrase=passphrase)


# --- the bundle, built once through the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_minilm_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`policy build` on a labelled corpus from the persona generator, with the tiny MiniLM."""
    from fedpref.simulations.persona import PersonaConfig, safety_corpus

    work = tmp_path_factory.mktemp("policy-build")
    records = safety_corpus(PersonaConfig(), n_per_class=20)
    data = work / "safety.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = run("policy", "build", "--data", data, "--out", "bundle", "--backbone", tiny_minilm_dir,
                 "--max-length", 32, cwd=work)
    return work / "bundle", result


@pytest.fixture
def bundle(built) -> Path:
    path, result = built
    ok(result)
    return path


# --- the round trip ---------------------------------------------------------------------------


def test_round_trip_init_build_sign_verify(tmp_path: Path, built) -> None:
    bundle_dir, build = built
    out = ok(build)
    assert out.startswith("built unsigned bundle ")
    assert "3 unsafe categories" in out and "validation" in out and "accuracy" in out
    assert sorted(os.listdir(bundle_dir)) == ["classifier.safetensors", "manifest.json"]

    init = ok(run("keys", "init", "--home", "ops", "--signers", "3", "--threshold", "2", cwd=tmp_path))
    assert "threshold 2 of 3" in init
    kdir = tmp_path / "ops" / "keys"
    assert sorted(os.listdir(kdir)) == ["root-v1.json", "root.json", "signer-1.pem", "signer-2.pem", "signer-3.pem"]
    for i in (1, 2, 3):
        pem = kdir / f"signer-{i}.pem"
        assert pem.stat().st_mode & 0o777 == 0o600
        assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    root = load_root((kdir / "root.json").read_bytes())
    assert (root.version, root.threshold, len(root.keys)) == (1, 2, 3)

    signed = ok(sign(tmp_path, bundle_dir, "policy.dsse.json", version=4, expires=in_days(60)))
    assert "signed fedpref-safety v4 with 2 of 3 keys" in signed

    verified = ok(run("policy", "verify", "policy.dsse.json", "--root", kdir / "root.json", cwd=tmp_path))
    assert verified.count("\n") == 1
    assert verified.startswith("OK policy.dsse.json: fedpref-safety v4")

    as_json = json.loads(ok(run("policy", "verify", "policy.dsse.json", "--root", kdir / "root.json",
                                "--json", cwd=tmp_path)))
    assert as_json["verified"] is True and as_json["version"] == 4 and len(as_json["signed_by"]) == 2

    # --min-version N: the version must be >= N
    ok(run("policy", "verify", "policy.dsse.json", "--root", kdir / "root.json", "--min-version", 4, cwd=tmp_path))
    line = one_error_line(run("policy", "verify", "policy.dsse.json", "--root", kdir / "root.json",
                              "--min-version", 5, cwd=tmp_path), ExitCode.POLICY_REJECTED)
    assert "policy.dsse.json" in line and "--min-version 5" in line


def test_tampered_envelope_is_rejected(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path)
    ok(sign(tmp_path, bundle, "policy.dsse.json"))
    good = (tmp_path / "policy.dsse.json").read_bytes()

    # one flipped byte inside the signed payload, re-encoded as valid base64
    doc = json.loads(good)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    (tmp_path / "flipped.dsse.json").write_text(json.dumps(doc))
    line = one_error_line(run("policy", "verify", "flipped.dsse.json", "--root", kdir / "root.json", cwd=tmp_path),
                          ExitCode.POLICY_REJECTED)
    assert line.startswith("error: flipped.dsse.json: rejected:") and "signatures" in line

    # one raw byte of the file changed
    raw = bytearray(good)
    raw[len(raw) // 3] = ord("A") if raw[len(raw) // 3] != ord("A") else ord("B")
    (tmp_path / "raw.dsse.json").write_bytes(bytes(raw))
    line = one_error_line(run("policy", "verify", "raw.dsse.json", "--root", kdir / "root.json", cwd=tmp_path),
                          ExitCode.POLICY_REJECTED)
    assert "raw.dsse.json" in line

    # `policy show` of the untouched file says it is unverified, and verifies with --root
    shown = ok(run("policy", "show", "policy.dsse.json", cwd=tmp_path))
    assert shown.startswith("UNVERIFIED") and "fedpref-safety v1" in shown
    shown_json = json.loads(ok(run("policy", "show", "policy.dsse.json", "--json", cwd=tmp_path)))
    assert shown_json["verified"] is False and "signed_by" not in shown_json
    assert ok(run("policy", "show", "policy.dsse.json", "--root", kdir / "root.json", cwd=tmp_path)).startswith("VERIFIED")
    one_error_line(run("policy", "show", "flipped.dsse.json", "--root", kdir / "root.json", cwd=tmp_path),
                   ExitCode.POLICY_REJECTED)
    one_error_line(run("policy", "show", "raw.dsse.json", cwd=tmp_path), ExitCode.POLICY_REJECTED)


def test_wrong_passphrase(tmp_path: Path, bundle: Path) -> None:
    keys_init(tmp_path)
    result = sign(tmp_path, bundle, "policy.dsse.json", passphrase="not the passphrase")
    line = one_error_line(result, ExitCode.WRONG_PASSPHRASE)
    assert "wrong passphrase" in line and "signer-1.pem" in line
    assert not (tmp_path / "policy.dsse.json").exists()
    one_error_line(run("keys", "rotate", "--home", "ops", cwd=tmp_path, passphrase="nope"), ExitCode.WRONG_PASSPHRASE)


def test_missing_key_file(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path)
    (kdir / "signer-1.pem").unlink()
    line = one_error_line(sign(tmp_path, bundle, "policy.dsse.json"), ExitCode.KEY_FILE)
    assert "signer-1.pem" in line
    assert not (tmp_path / "policy.dsse.json").exists()


def test_k_of_n_signs_with_one_key_missing_but_not_two(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path, "ops", "--signers", 3, "--threshold", 2)
    (kdir / "signer-1.pem").unlink()
    ok(sign(tmp_path, bundle, "p.dsse.json"))
    ok(run("policy", "verify", "p.dsse.json", "--root", kdir / "root.json", cwd=tmp_path))
    (kdir / "signer-3.pem").unlink()
    line = one_error_line(sign(tmp_path, bundle, "q.dsse.json", version=2), ExitCode.KEY_FILE)
    assert "1 of the 2" in line


def test_missing_or_bad_root_file(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path)
    ok(sign(tmp_path, bundle, "p.dsse.json"))
    line = one_error_line(run("policy", "verify", "p.dsse.json", "--root", "nowhere.json", cwd=tmp_path),
                          ExitCode.KEY_FILE)
    assert "nowhere.json" in line
    line = one_error_line(run("policy", "verify", "p.dsse.json", "--root", "p.dsse.json", cwd=tmp_path),
                          ExitCode.KEY_FILE)
    assert "not a valid trust root" in line
    (kdir / "root.json").unlink()
    one_error_line(sign(tmp_path, bundle, "q.dsse.json", version=2), ExitCode.KEY_FILE)


def test_expired_policy(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path)
    ok(sign(tmp_path, bundle, "short.dsse.json", expires=in_days(1)))
    root = kdir / "root.json"
    ok(run("policy", "verify", "short.dsse.json", "--root", root, cwd=tmp_path))
    line = one_error_line(run("policy", "verify", "short.dsse.json", "--root", root, "--now", in_days(2),
                              cwd=tmp_path), ExitCode.POLICY_EXPIRED)
    assert "short.dsse.json" in line and "expired" in line
    # an expired trust root has its own code
    one_error_line(run("policy", "verify", "short.dsse.json", "--root", root, "--now", in_days(400), cwd=tmp_path),
                   ExitCode.ROOT_EXPIRED)
    # signing with an expiry in the past is refused
    line = one_error_line(sign(tmp_path, bundle, "past.dsse.json", version=2, expires="2001-01-01"), ExitCode.CONFIG)
    assert "not in the future" in line
    assert not (tmp_path / "past.dsse.json").exists()


def test_rotate_then_verify(tmp_path: Path, bundle: Path) -> None:
    kdir = keys_init(tmp_path, "ops", "--signers", 2, "--threshold", 2)
    old_ids = set(load_root((kdir / "root.json").read_bytes()).keys)
    ok(sign(tmp_path, bundle, "old.dsse.json", version=1))  # signed by the keys about to retire

    rotated = ok(run("keys", "rotate", "--home", "ops", "--signers", 3, "--threshold", 2, cwd=tmp_path))
    assert "v1 -> v2" in rotated and "2 of 2 -> 2 of 3" in rotated
    assert sorted(os.listdir(kdir / "retired-v1")) == ["signer-1.pem", "signer-2.pem"]
    assert sorted(p.name for p in kdir.glob("signer-*.pem")) == ["signer-1.pem", "signer-2.pem", "signer-3.pem"]
    assert not [p for p in kdir.iterdir() if p.name.startswith(".")]
    v1, v2 = (kdir / "root-v1.json").read_bytes(), (kdir / "root-v2.json").read_bytes()
    assert (kdir / "root.json").read_bytes() == v2
    new = update_root(load_root(v1), v2)  # the chain a v1 client follows
    assert new.version == 2 and not (set(new.keys) & old_ids) and new.revoked == frozenset(old_ids)

    ok(sign(tmp_path, bundle, "new.dsse.json", version=2))
    root = kdir / "root.json"
    ok(run("policy", "verify", "new.dsse.json", "--root", root, cwd=tmp_path))
    ok(run("policy", "verify", "new.dsse.json", "--root", kdir / "root-v1.json", "--root", kdir / "root-v2.json",
           cwd=tmp_path))
    # the policy signed by the retired keys fails against the new root, and as revoked along the chain
    line = one_error_line(run("policy", "verify", "old.dsse.json", "--root", root, cwd=tmp_path),
                          ExitCode.POLICY_REJECTED)
    assert "old.dsse.json" in line and "untrusted" in line
    line = one_error_line(run("policy", "verify", "old.dsse.json", "--root", kdir / "root-v1.json",
                              "--root", kdir / "root-v2.json", cwd=tmp_path), ExitCode.POLICY_REJECTED)
    assert "2 revoked" in line
    # ...and the new policy is not accepted by a client that never followed the rotation
    one_error_line(run("policy", "verify", "new.dsse.json", "--root", kdir / "root-v1.json", cwd=tmp_path),
                   ExitCode.POLICY_REJECTED)
    # a chain given in the wrong order is a bad root file
    one_error_line(run("policy", "verify", "new.dsse.json", "--root", kdir / "root-v2.json",
                       "--root", kdir / "root-v1.json", cwd=tmp_path), ExitCode.KEY_FILE)

    # a retired key put back among the signers is refused, not silently used
    shutil.copy(kdir / "retired-v1" / "signer-1.pem", kdir / "signer-4.pem")
    (kdir / "signer-2.pem").unlink()
    (kdir / "signer-3.pem").unlink()
    line = one_error_line(sign(tmp_path, bundle, "mixed.dsse.json", version=3), ExitCode.KEY_FILE)
    assert "signer-4.pem" in line and "not a key of trust root v2" in line


def test_keys_init_refuses_existing_keys_and_bad_threshold(tmp_path: Path) -> None:
    keys_init(tmp_path)
    before = (tmp_path / "ops" / "keys" / "root.json").read_bytes()
    line = one_error_line(run("keys", "init", "--home", "ops", cwd=tmp_path), ExitCode.CONFIG)
    assert "already holds keys" in line and "keys rotate" in line
    assert (tmp_path / "ops" / "keys" / "root.json").read_bytes() == before
    line = one_error_line(run("keys", "init", "--home", "other", "--signers", 2, "--threshold", 3, cwd=tmp_path),
                          ExitCode.CONFIG)
    assert "--threshold=3" in line
    one_error_line(run("keys", "init", "--home", "other", "--threshold", 0, cwd=tmp_path), ExitCode.CONFIG)
    assert not (tmp_path / "other" / "keys").exists()
    line = one_error_line(run("keys", "init", "--home", "third", cwd=tmp_path, passphrase=None), ExitCode.CONFIG)
    assert policy_cli.PASSPHRASE_ENV in line


def test_build_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "category": "safe"}\nnot json\n')
    line = one_error_line(run("policy", "build", "--data", bad, "--out", "b", cwd=tmp_path), ExitCode.DATA)
    assert f"{bad}:2" in line
    (tmp_path / "afile").write_text("x")
    one_error_line(run("policy", "build", "--data", bad, "--out", "afile", cwd=tmp_path), ExitCode.CONFIG)
    one_error_line(run("policy", "verify", "missing.dsse.json", "--root", "r.json", cwd=tmp_path), ExitCode.USAGE)


def test_exit_codes_lists_the_policy_codes() -> None:
    out = ok(run("exit-codes", cwd=Path.cwd()))
    for code in (ExitCode.POLICY_REJECTED, ExitCode.KEY_FILE, ExitCode.WRONG_PASSPHRASE,
                 ExitCode.POLICY_EXPIRED, ExitCode.ROOT_EXPIRED):
        assert f"{int(code):>3}  {code.name}" in out
        assert EXIT_CODE_HELP[code] in out


@pytest.mark.parametrize(
    ("error", "code"),
    [(WrongPassphraseError("x"), ExitCode.WRONG_PASSPHRASE), (KeyFileError("x"), ExitCode.KEY_FILE),
     (MalformedRootError("x"), ExitCode.KEY_FILE), (ExpiredPolicyError("x"), ExitCode.POLICY_EXPIRED),
     (ExpiredRootError("x"), ExitCode.ROOT_EXPIRED), (RollbackError("x"), ExitCode.POLICY_REJECTED),
     (RevokedKeyError("x"), ExitCode.POLICY_REJECTED), (SignatureThresholdError("x"), ExitCode.POLICY_REJECTED)],
)
def test_policy_errors_map_to_their_codes(error: Exception, code: ExitCode) -> None:
    assert exit_code_for(error) is code


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2027-01-01", datetime(2027, 1, 1, tzinfo=timezone.utc)),
     ("2027-01-01T00:00:00Z", datetime(2027, 1, 1, tzinfo=timezone.utc)),
     ("2027-01-01t10:30:00z", datetime(2027, 1, 1, 10, 30, tzinfo=timezone.utc)),
     ("2027-01-01T02:00:00+02:00", datetime(2027, 1, 1, tzinfo=timezone.utc)),
     ("2027-01-01 12:00", datetime(2027, 1, 1, 12, tzinfo=timezone.utc)),
     ("2026-12-31T19:00:00-05:00", datetime(2027, 1, 1, tzinfo=timezone.utc))],
)
def test_parse_when_is_lenient_and_utc(text: str, expected: datetime) -> None:
    got = policy_cli.parse_when(text, "--expires")
    assert got == expected and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["tomorrow", "2027-13-01", "", "01/02/2027"])
def test_parse_when_rejects_garbage(text: str) -> None:
    from fedpref.common.errors import ConfigError

    with pytest.raises(ConfigError, match="ISO 8601"):
        policy_cli.parse_when(text, "--expires")


# --- in process: the prompt and an interrupted rotation ---------------------------------------

runner = CliRunner()


def test_passphrase_prompt_when_no_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(policy_cli.PASSPHRASE_ENV, raising=False)
    monkeypatch.setattr(policy_cli, "_stdin_is_tty", lambda: True)
    home = str(tmp_path / "ops")
    mismatch = runner.invoke(app, ["keys", "init", "--home", home], input="one\ntwo\none\none\n")
    assert mismatch.exit_code == 0, mismatch.stderr  # click asks again after a mismatch
    assert "Key passphrase" in mismatch.stderr and "Key passphrase" not in mismatch.stdout
    bad = runner.invoke(app, ["keys", "rotate", "--home", home], input="two\n")
    assert bad.exit_code == ExitCode.WRONG_PASSPHRASE
    good = runner.invoke(app, ["keys", "rotate", "--home", home], input="one\n")
    assert good.exit_code == 0, good.stderr
    monkeypatch.setenv(policy_cli.PASSPHRASE_ENV, "")
    empty = runner.invoke(app, ["keys", "rotate", "--home", home])
    assert empty.exit_code == ExitCode.CONFIG and "empty" in empty.stderr


def test_interrupted_rotation_is_finished_or_rolled_back(tmp_path: Path, bundle: Path, monkeypatch) -> None:
    monkeypatch.setenv(policy_cli.PASSPHRASE_ENV, PASS)
    home = tmp_path / "ops"
    kdir = home / "keys"
    assert runner.invoke(app, ["keys", "init", "--home", str(home)]).exit_code == 0

    # a staged rotation that never committed root.json is dropped; the old keys stay in force
    stage = kdir / ".next-v2"
    stage.mkdir()
    (stage / "signer-1.pem").write_text("half-written")
    signed = runner.invoke(app, ["policy", "sign", str(bundle), "--home", str(home), "--version", "1",
                                 "--expires", in_days(10), "--out", str(tmp_path / "a.dsse.json")])
    assert signed.exit_code == 0, signed.stderr
    assert not stage.exists() and load_root((kdir / "root.json").read_bytes()).version == 1

    # a rotation that committed root.json but crashed before moving the keys is finished later
    finish = keys.finish_rotation
    calls: list[Path] = []
    monkeypatch.setattr(keys, "finish_rotation", lambda d: calls.append(d))
    rotated = runner.invoke(app, ["keys", "rotate", "--home", str(home)])
    assert rotated.exit_code == 0, rotated.stderr
    assert calls and (kdir / ".next-v2" / "root.json").exists()  # staged, committed, not yet moved
    assert load_root((kdir / "root.json").read_bytes()).version == 2
    monkeypatch.setattr(keys, "finish_rotation", finish)
    signed = runner.invoke(app, ["policy", "sign", str(bundle), "--home", str(home), "--version", "2",
                                 "--expires", in_days(10), "--out", str(tmp_path / "b.dsse.json")])
    assert signed.exit_code == 0, signed.stderr
    assert not (kdir / ".next-v2").exists() and (kdir / "retired-v1" / "signer-1.pem").exists()
    verified = runner.invoke(app, ["policy", "verify", str(tmp_path / "b.dsse.json"), "--root", str(kdir / "root.json")])
    assert verified.exit_code == 0 and verified.stdout.startswith("OK ")


def test_a_busy_key_folder_is_refused(tmp_path: Path, bundle: Path, monkeypatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setenv(policy_cli.PASSPHRASE_ENV, PASS)
    home = tmp_path / "ops"
    assert runner.invoke(app, ["keys", "init", "--home", str(home)]).exit_code == 0
    fd = os.open(home / "keys", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another rotation in progress would
        busy = runner.invoke(app, ["keys", "rotate", "--home", str(home)])
        assert busy.exit_code == ExitCode.CONFIG and "in use" in busy.stderr
        busy = runner.invoke(app, ["policy", "sign", str(bundle), "--home", str(home), "--version", "1",
                                   "--expires", in_days(5), "--out", str(tmp_path / "p.dsse.json")])
        assert busy.exit_code == ExitCode.CONFIG and not (tmp_path / "p.dsse.json").exists()
    finally:
        os.close(fd)
    assert runner.invoke(app, ["keys", "rotate", "--home", str(home)]).exit_code == 0
