"""``fedpref-sim``: generate benchmark data, run simulations, benchmark the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fedpref.common.errors import ConfigError, DataError, FedPrefError
from fedpref.common.exit_codes import exit_code_for, run_cli

app = typer.Typer(rich_markup_mode=None, help="Federated personalization simulations (researchers).", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(e: FedPrefError) -> None:
    """One line ``error: ...`` and the error's documented exit code (``fedpref-server exit-codes``)."""
    err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(int(exit_code_for(e)))


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write")],
    users: Annotated[int, typer.Option(help="number of simulated users")] = 40,
    pairs_per_user: Annotated[int, typer.Option("--pairs-per-user", help="train + test pairs per user")] = 100,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same bytes")] = 0,
    safety_corpus: Annotated[Path | None, typer.Option("--safety-corpus", help="also write labelled texts (text, category) for `policy build`")] = None,
) -> None:
    """Generate the `persona` benchmark as JSONL."""
    from fedpref.client.data import write_jsonl
    from fedpref.simulations import persona

    try:
        for option, path in (("--out", out), ("--safety-corpus", safety_corpus)):
            if path is not None and path.is_dir():
                raise ConfigError(f"{option} {path} is a folder; give a file path, e.g. {path / 'persona.jsonl'}")
        cfg = persona.PersonaConfig(users=users, pairs_per_user=pairs_per_user, seed=seed)
        data = persona.generate(cfg)
        try:
            write_jsonl(data.pairs, out)
            if safety_corpus is not None:
                write_jsonl(persona.safety_corpus(cfg), safety_corpus)
        except OSError as e:
            raise ConfigError(f"{e.filename or out}: cannot write ({e.strerror or e}); check the folder exists "
                              "and is writable") from None
    except FedPrefError as e:
        _fail(e)
    err.print(f"wrote {len(data.pairs)} pairs for {users} users to {out}")


@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", help="output folder: results.json, report.html, figures")],
    config: Annotated[Path | None, typer.Option("--config", help="simulation TOML (default: the demo config)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="preference JSONL (default: generate persona data)")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="join a Ray cluster, e.g. auto or ray://head:10001")] = None,
    secure_aggregation: Annotated[bool | None, typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="Flower SecAgg+ for the federated methods (default: [runtime] secure_aggregation)")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", min=0, max=2**32 - 1,
        help="reseed the benchmark and the run: [persona] seed and [runtime] seed (for tables over seeds)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="show Flower's logs")] = False,
) -> None:
    """Run aggregated, local, finetuned and personalized training and write a report."""
    import dataclasses

    from fedpref.simulations.config import CONFIG_DIR, load_sim_config
    from fedpref.simulations.report import cost_line, summary_rows
    from fedpref.simulations.runner import run_simulation

    try:
        cfg = load_sim_config(config)
        if ray_address:
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, ray_address=ray_address))
        if seed is not None:
            cfg = dataclasses.replace(cfg, persona=dataclasses.replace(cfg.persona, seed=seed),
                                      runtime=dataclasses.replace(cfg.runtime, seed=seed))
        if secure_aggregation is not None:
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, secure_aggregation=secure_aggregation))
        if data is not None and not data.is_file():
            raise DataError(f"{data}: data file not found; give a JSONL of preference pairs or leave --data out")
        res = run_simulation(cfg, out=out, data=data, config_file=(config or CONFIG_DIR / "demo.toml").resolve(), verbose=verbose)
    except FedPrefError as e:
        _fail(e)
    table = Table(title=f"fedpref — {out / 'results.json'}")
    for col in ("method", "mean acc", "p10 acc", "worst community"):
        table.add_column(col)
    for m, mean, lo, worst, wa in summary_rows(res):
        table.add_row(m, f"{mean:.3f}", f"{lo:.3f}", f"{worst} {wa:.3f}")
    Console().print(table)
    pr = res["privacy"]
    Console().print(
        f"ε_user = {pr['epsilon_user']:.3f}, max ε_sample = {pr['epsilon_sample_max']:.3f} at δ = {pr['delta']:g}; "
        f"wall {res['cost']['wall_seconds']:.0f} s; report: {out / 'report.html'}"
    )
    Console().print(cost_line(res), highlight=False, soft_wrap=True)


@app.command()
def bench(
    steps: Annotated[int, typer.Option(help="timed steps per mode")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
) -> None:
    """DP-SGD step time over non-DP step time, and LoRA on the last block over LoRA on the neck, in one run."""
    from fedpref.simulations.bench import bench_dp_overhead, bench_neck

    bench_dp_overhead(steps=steps, batch_size=batch_size)
    bench_neck(steps=steps, batch_size=batch_size)


@app.command()
def curve(
    runs: Annotated[list[Path], typer.Argument(help="--out folders of runs that differ in the number of users only")],
    out: Annotated[Path, typer.Option("--out", help="folder for scale_curve.json and scale_curve.png")],
) -> None:
    """The scale curve: accuracy per method against the number of federated users."""
    from fedpref.simulations.tables import plot_scale_curve, scale_curve, write_table

    try:
        doc = scale_curve(runs)
        path = write_table(doc, out, "scale_curve.json")
        plot_scale_curve(doc, out / "scale_curve.png")
    except FedPrefError as e:
        _fail(e)
    for p in doc["points"]:
        Console().print(f"{p['users']:>5} users: " + ", ".join(
            f"{m} {p[m]:.3f}" for m in ("personalized", "local", "aggregated", "oracle") if p.get(m) is not None)
            + (f"; new users k=10: personalized {p['new_users_k10_personalized']:.3f}"
               if p.get("new_users_k10_personalized") is not None else ""), highlight=False)
    Console().print(f"wrote {path} and {out / 'scale_curve.png'}", highlight=False)


@app.command()
def seeds(
    runs: Annotated[list[Path], typer.Argument(help="--out folders of one config run with different --seed")],
    out: Annotated[Path, typer.Option("--out", help="folder for seeds.json")],
) -> None:
    """Mean ± sd over seeds, and issue 11's targets checked on them."""
    from fedpref.simulations.tables import seed_table, write_table

    try:
        doc = seed_table(runs)
        path = write_table(doc, out, "seeds.json")
    except FedPrefError as e:
        _fail(e)
    mean, sd = doc["mean"], doc["sd"]
    for m in ("personalized", "local", "aggregated", "finetuned", "count", "oracle"):
        if m in mean:
            Console().print(f"{m:>13}: {mean[m]:.3f} ± {sd[m]:.3f}", highlight=False)
    for t in doc["targets"].values():
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        val = "–" if t["value"] is None else f"{t['value']:.3f}"
        bound = "–" if t["bound"] is None else f"{t['bound']:.3f}"
        Console().print(f"{verdict:>6}  {t['what']}: {val} vs {bound}", highlight=False)
    Console().print(f"wrote {path}", highlight=False)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: errors are one line with their exit code (2 for the command line)."""
    run_cli(app, argv, "fedpref-sim")


if __name__ == "__main__":
    main()
