"""curves.png shows the few curves a user reads first; curves_all.png every logged metric."""
from utils.metrics import MetricsLogger, main_panels, read_jsonl


def test_main_panels_pick_the_curves_a_user_reads():
    step3 = ["train/reward", "train/kl", "train/gt_score", "train/actor_loss", "train/critic_loss",
             "train/lr_actor", "train/entropy", "train/generation_s"]
    panels = main_panels(step3)
    assert [p[0] for p in panels] == ["Reward", "KL to the reference", "Ground-truth score", "Loss",
                                      "Learning rate"]
    assert [key for key, _ in panels[3][3]] == ["train/actor_loss", "train/critic_loss"]
    step1 = ["train/loss", "train/lr", "eval/loss", "eval/perplexity", "train/tokens_per_s"]
    assert [p[0] for p in main_panels(step1)] == ["Loss", "Held-out perplexity", "Learning rate"]
    assert [p[0] for p in main_panels(["train/skipped_nonfinite"])] == ["train/skipped_nonfinite"]


def test_logger_writes_main_and_all_curves(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log(step, {"reward": step, "kl": 0.1 * step, "actor_loss": 1 / step, "generation_s": 2.0},
                   prefix="train/")
    logger.close()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "curves_all.png").stat().st_size > 1000


def test_resume_drops_a_record_a_kill_cut_short(tmp_path):
    """A SIGKILL can land inside a record's write: --resume must not choke on the torn line."""
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step}, prefix="train/")
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "train/lo')  # the killed run's last, unfinished write
    resumed = MetricsLogger(tmp_path)
    resumed.truncate_after(2)
    resumed.log(3, {"loss": 0.3}, prefix="train/")
    resumed.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 0.3
