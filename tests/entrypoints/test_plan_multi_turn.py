"""`drt-run plan --dataset multi-turn` (issue 12): configurations screened on the turns
flattened, rescored on conversations with the runtime's prefix cache, and a placement
file `drt-run serve --placement` runs with the cache the plan counted on."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser, main
from distserve_rt.planner.candidates import Algorithm, Candidate
from distserve_rt.planner.conversation_plan import ConversationPlanner
from distserve_rt.planner.placement_file import load_placement

FLAGS = ["plan", "--dataset", "multi-turn", "--num-conversations", "20"]
FLAGS += ["--length-scale", "0.3", "--num-nodes", "1", "--devices-per-node", "4"]


def _plan(tmp_path, capsys, *flags: str, name: str = "placement.yaml"):
    path = tmp_path / name
    assert main([*FLAGS, *flags, "--output", str(path), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out), path


def test_a_conversation_plan_is_a_file_serve_runs_with_the_prefix_cache(tmp_path, capsys, caplog):
    out, path = _plan(tmp_path, capsys, "--rate", "1")
    assert out["conversation_rate"] == 1 and out["prefix_caching"]
    assert out["request_rate"] == pytest.approx(out["mean_turns"])  # 1 conversation/s
    # Both kinds were rescored on conversations, the chosen one checked whole at the rate.
    assert {r["placement"] for r in out["ranked"]} == {"colocated", "disaggregated"}
    (chosen,) = [r for r in out["ranked"] if r["chosen"]]
    check = chosen["check_at_rate"]
    assert check["conversation_rate"] == 1 and check["attainment"] >= 0.9
    assert 0 < check["hit_rate"] < 1 and chosen["num_units"] * chosen["unit_goodput"] >= 1
    # Ranked as the search ranks: the most conversations/s per device first.
    per_device = [r["per_device_goodput"] for r in out["ranked"]]
    assert per_device == sorted(per_device, reverse=True)
    planned = load_placement(path)
    assert planned.engine["enable_prefix_caching"] is True
    assert planned.predicted["rate_unit"] == "conversations/s"
    assert planned.predicted["meets_target"]
    args = build_parser().parse_args(["serve", "--placement", str(path)])
    with caplog.at_level(logging.WARNING, logger="distserve_rt"):
        config, placement, _ = engine_args.configs_from_args(args)
    assert config.enable_prefix_caching and placement.kind.value == planned.placement
    args = build_parser().parse_args(
        ["serve", "--placement", str(path), "--no-enable-prefix-caching"]
    )
    with pytest.raises(ValueError) as err:
        engine_args.configs_from_args(args)
    assert str(err.value).startswith(
        "--no-enable-prefix-caching but the placement file was planned with --enable-prefix-caching"
    )


def test_the_prefix_cache_raises_what_each_configuration_carries(tmp_path, capsys):
    on, _ = _plan(tmp_path, capsys, "--rate", "1")
    off, path = _plan(tmp_path, capsys, "--rate", "1", "--no-prefix-caching", name="off.yaml")
    assert load_placement(path).engine["enable_prefix_caching"] is False
    g_on = {r["config"]: r["unit_goodput"] for r in on["ranked"]}
    g_off = {r["config"]: r["unit_goodput"] for r in off["ranked"]}
    common = g_on.keys() & g_off.keys()
    assert common and sum(g_on[c] for c in common) > 1.1 * sum(g_off[c] for c in common)
    assert all(r["hit_rate_at_goodput"] > 0 for r in on["ranked"])
    assert all(r["hit_rate_at_goodput"] == 0 for r in off["ranked"])


def test_a_rate_beyond_the_cluster_gets_the_best_it_can_do(tmp_path, capsys):
    out, path = _plan(tmp_path, capsys, "--rate", "40")
    assert out["best_effort"] and out["fits_cluster"]
    assert path.read_text().startswith("# best effort: sustains ")
    assert "conversations/s of the 40 asked" in path.read_text().splitlines()[0]
    assert out["needed"]["num_devices"] > 4
    assert out["placement"]["predicted"]["conversation_rate"] < 40


def test_the_table_names_the_unit_and_the_choice_and_the_plot_is_drawn(tmp_path, capsys):
    png = tmp_path / "plan.png"
    argv = [*FLAGS, "--rate", "1", "--output", "", "--no-progress", "--plot", str(png)]
    assert main(argv) == 0
    assert png.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "1 conversations/s asked" in text.splitlines()[0]
    assert "prefix caching on" in text.splitlines()[0]
    assert any(line.startswith("chosen: ") for line in text.splitlines())
    assert "prefix cache hit rate" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-requests", "5"], "--num-requests does not apply to --dataset multi-turn"),
        (["--cv", "2"], "--cv: conversations start as a Poisson process"),
        (["--turns", "3"], "--turns must be MIN,MAX (ints), got '3'"),
    ],
)
def test_refusals_are_one_line(flags, message):
    with pytest.raises(SystemExit) as exc:
        main([*FLAGS, "--rate", "1", *flags, "--output", ""])
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


def _cand(algorithm, prefill, decode=None):
    n_d = 0 if decode is None else 1
    return Candidate(algorithm, prefill, decode, 1, n_d, 1.0, 1.0, unit=None)


def test_rescoring_takes_the_best_of_each_kind_that_pp1_allows():
    """The scheduler-driven simulator runs pp=1 only: a PP configuration is named as not
    rescored, and each kind fills its own quota in the screened order."""
    pairs, colocated = Algorithm.PAIRS_IN_NODES, Algorithm.COLOCATED
    screened = [
        _cand(pairs, Parallelism(1, 2), Parallelism(1, 1)),
        _cand(pairs, Parallelism(2, 1), Parallelism(1, 1)),
        _cand(colocated, Parallelism(1, 1)),
        _cand(pairs, Parallelism(1, 1), Parallelism(1, 1)),
        _cand(colocated, Parallelism(2, 1)),
        _cand(pairs, Parallelism(4, 1), Parallelism(1, 1)),
    ]
    fake = SimpleNamespace(quota={False: 2, True: 1})
    chosen, skipped = ConversationPlanner._to_rescore(fake, screened)
    assert chosen == [screened[1], screened[2], screened[3]]
    assert skipped == [
        ("P tp1pp2 + D tp1pp1", "pp=2: the scheduler-driven simulator runs pp=1 only")
    ]


def _only(monkeypatch, placement: str) -> None:
    """Rescore only ``placement``'s configurations, forcing the plan's kind of answer."""
    rescore = ConversationPlanner._to_rescore

    def only(self, screened):
        kept = [c for c in screened if (c.decode is None) == (placement == "colocated")]
        return rescore(self, kept)

    monkeypatch.setattr(ConversationPlanner, "_to_rescore", only)


FEW = [*FLAGS, "--rate", "1"]


def test_a_disaggregated_plan_carries_its_routing_settings_to_serve(tmp_path, capsys, monkeypatch):
    """--local-prefill-max-tokens rescores and checks the disaggregated configurations with
    conditional disaggregation on, and the file's ``disagg`` makes serve run (and hold its
    flags to) the routing that was planned."""
    _only(monkeypatch, "disaggregated")
    path = tmp_path / "p.yaml"
    argv = [*FEW, "--local-prefill-max-tokens", "4096", "--max-decode-load-imbalance", "2"]
    assert main([*argv, "--output", str(path), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    (chosen,) = [r for r in out["ranked"] if r["chosen"]]
    assert chosen["placement"] == "disaggregated"
    assert chosen["check_at_rate"]["num_local_prefills"] > 0  # the planner ran with it
    planned = load_placement(path)
    assert planned.disagg == {
        "decode_prefix_caching": True,
        "max_decode_load_imbalance": 2,
        "local_prefill_max_tokens": 4096,
        "local_prefill_min_queue_tokens": 0,
    }
    args = build_parser().parse_args(["serve", "--placement", str(path)])
    _, _, disagg = engine_args.configs_from_args(args)
    assert disagg.local_prefill_max_tokens == 4096 and disagg.max_decode_load_imbalance == 2
    argv = ["serve", "--placement", str(path), "--local-prefill-max-tokens", "64"]
    with pytest.raises(ValueError) as err:
        engine_args.configs_from_args(build_parser().parse_args(argv))
    assert str(err.value) == (
        "--local-prefill-max-tokens 64 but the placement file was planned with 4096; drop the "
        "flag or plan again with that setting"
    )


def test_a_colocated_plan_writes_no_routing_settings(tmp_path, capsys, monkeypatch):
    _only(monkeypatch, "colocated")
    path = tmp_path / "p.yaml"
    argv = [*FEW, "--local-prefill-max-tokens", "4096", "--output", str(path), "--json"]
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["placement"]["placement"] == "colocated"
    assert load_placement(path).disagg == {} and "disagg:" not in path.read_text()


def test_the_routing_flags_need_multi_turn():
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--rate", "1", "--local-prefill-max-tokens", "64", "--output", ""])
    assert str(exc.value).endswith("--local-prefill-max-tokens: only with --dataset multi-turn")
    assert len(str(exc.value).splitlines()) == 1
