"""The pure parts of the stock-FLARE peer benchmark (tests/benchmarks/stock_flare_peer.py, issue 10 item 3)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier

_PATH = Path(__file__).resolve().parent / "benchmarks" / "stock_flare_peer.py"
_spec = importlib.util.spec_from_file_location("stock_flare_peer", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def test_overhead_is_round_wall_minus_slowest_site_median_over_rounds():
    walls = {0: 20.0, 1: 5.0, 2: 6.0}
    train = {0: {"site-1": 3.0, "site-2": 1.0}, 1: {"site-1": 4.0, "site-2": 4.5}, 2: {"site-1": 3.0, "site-2": 2.0}}
    result = peer.flare_overhead(walls, train)
    assert [r["slowest_site"] for r in result["rounds"]] == ["site-1", "site-2", "site-1"]
    assert [r["overhead_seconds"] for r in result["rounds"]] == pytest.approx([17.0, 0.5, 3.0])
    assert result["median_seconds"] == pytest.approx(3.0)
    assert result["median_fraction"] == pytest.approx(0.5)  # 17/20=0.85, 0.5/5=0.1, 3/6=0.5
    assert result["total_fraction"] == pytest.approx(20.5 / 31.0)
    assert result["median_round_wall_seconds"] == pytest.approx(6.0)
    later = result["after_first_round"]  # without round 0's start-up: overheads 0.5 and 3.0
    assert later["rounds"] == 2
    assert later["median_seconds"] == pytest.approx(1.75)
    assert later["median_fraction"] == pytest.approx((0.1 + 0.5) / 2)
    assert later["median_round_wall_seconds"] == pytest.approx(5.5)


def test_overhead_skips_rounds_missing_either_time_and_handles_none():
    result = peer.flare_overhead({0: 10.0, 1: 8.0}, {1: {"site-1": 2.0}, 2: {"site-1": 1.0}, 3: {}})
    assert [r["round"] for r in result["rounds"]] == [1]
    assert result["rounds_skipped"] == [0, 2, 3]
    assert result["after_first_round"] is None
    empty = peer.flare_overhead({}, {})
    assert empty["median_seconds"] is None and empty["rounds"] == []


def test_overhead_refuses_a_non_positive_wall_time():
    with pytest.raises(ValueError, match="round 0"):
        peer.flare_overhead({0: 0.0}, {0: {"site-1": 1.0}})


def test_round_walls_parsed_from_our_controller_lines_zero_based():
    log = (
        "2026-12-01 10:55:22,134 - INFO - [fedmed] round 1/2: 2/2 sites answered (site-1, site-2); median validation "
        "val_auc of the global model entering the round: 0.7266; bounded: site-1; 27.9 s\n"
        "2026-12-01 10:55:23,000 - INFO - something else; 3.0 s later\n"
        "2026-12-01 10:55:27,654 - INFO - [fedmed] round 2/2: 2/2 sites answered (site-1, site-2); 5.5 s\n"
    )
    assert peer.parse_round_walls(log) == {0: 27.9, 1: 5.5}


def test_log_span_from_first_timestamp_to_last_or_to_a_marker():
    log = ("no timestamp here\n"
           "2026-12-01 10:00:00,500 - INFO - start\n"
           "2026-12-01 10:00:30,000 - INFO - [fedmed] finished 2 rounds\n"
           "2026-12-01 10:01:00,500 - INFO - End the Simulator run.\n")
    assert peer.log_span_seconds(log) == pytest.approx(60.0)
    assert peer.log_span_seconds(log, until="[fedmed] finished 2 rounds") == pytest.approx(29.5)
    assert peer.log_span_seconds("nothing") is None
    assert peer.log_span_seconds(log, until="[fedmed] finished 3 rounds") is None  # marker absent: no figure
    banner = "2026-12-01 10:00:00,000 - INFO - a\n2026-12-01 10:00:12,000 - FedAvg - INFO - \n====\n  Finished FedAvg.  \n"
    assert peer.log_span_seconds(banner + "2026-12-01 10:00:20,000 - INFO - end\n", until="Finished FedAvg.") == pytest.approx(12.0)


def test_stock_round_walls_from_flare_banners_and_site_train_lines():
    server_log = (
        "2026-12-01 10:58:13,319 - FedAvg - INFO - [wf=controller] - \n"
        "--------\n                Round 0 started.                \n--------\n"
        "2026-12-01 10:58:26,500 - FedAvg - INFO - [wf=controller] - \n"
        "--------\n                Round 1 started.                \n--------\n"
        "2026-12-01 10:58:30,882 - FedAvg - INFO - [wf=controller] - \n"
        "========\n                Finished FedAvg.                \n========\n"
    )
    assert peer.stock_round_walls(server_log) == pytest.approx({0: 13.181, 1: 4.382})
    site_log = ("2026-12-01 10:58:26,009 - TaskScriptRunner - INFO - [stock-peer] site-1 round 0: global model val "
                "accuracy 0.5529; trained 22 steps in 1.54 s\n")
    other = "x [stock-peer] site-2 round 0: global model val accuracy 0.06; trained 4 steps in 0.51 s\n"
    assert peer.stock_train_seconds([site_log, other]) == {0: {"site-1": 1.54, "site-2": 0.51}}


def test_command_line_names_the_missing_file(tmp_path, capsys):
    assert peer.main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert peer.main([str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.json") in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text('{"num_rounds": 2, "rounds": [], "external": {"results": {}}}')
    assert peer.main([str(tmp_path)]) == 2
    assert str(tmp_path / "sites") in capsys.readouterr().err
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "site-1.npz").write_bytes(b"")
    (tmp_path / "external").mkdir()
    (tmp_path / "external" / "external-val.npz").write_bytes(b"")
    assert peer.main([str(tmp_path)]) == 2
    assert "external.results['external-val']['global_model']" in capsys.readouterr().err


def test_command_line_refuses_abbreviated_options(tmp_path):
    with pytest.raises(SystemExit):
        peer.main([str(tmp_path), "--thr", "2"])
