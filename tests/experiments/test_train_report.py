"""experiments/train_report.py: the medians of a run's timed train rows."""

import json

from experiments import train_report


def test_report_takes_medians_of_timed_rows(tmp_path, capsys):
  work = tmp_path / "moe_gpu"
  work.mkdir()
  rows = [{"step": 1, "split": "train", "loss": 5.0, "flops_per_token": 10.0},
          *({"step": s, "split": "train", "loss": 4.0 - s / 100, "flops_per_token": 10.0,
             "steps_per_s": r, "tokens_per_s": 100 * r, "flops_per_s": 1000 * r, "mfu": r / 10}
            for s, r in ((2, 1.0), (3, 3.0), (4, 2.0))),
          {"step": 4, "split": "eval", "loss": 9.0}]
  (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (work / "config.json").write_text(json.dumps({
      "train": {"remat": "block"}, "model": {"dtype": "bfloat16", "num_experts": 8,
                                            "moe_dispatch": "dropless"},
      "data": {"batch_size": 16, "seq_len": 1024}}))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
  out = tmp_path / "r.json"
  assert train_report.main([f"--json={out}", str(work)]) == 0
  (row,) = json.loads(out.read_text())
  assert (row["steps"], row["timed_rows"], row["loss"]) == (4, 3, 3.96)
  assert (row["steps_per_s"], row["tokens_per_s"], row["mfu"]) == (2.0, 200.0, 0.2)
  assert (row["remat"], row["dispatch"], row["seq_len"]) == ("block", "dropless", 1024)
  assert "MFU  20.0%" in capsys.readouterr().out
  assert train_report.main([str(empty)]) == 1   # no timed row: the section fails
