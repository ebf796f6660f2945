"""Saving Step 3's final models: actor, actor_ema and critic, all or none."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from training.step3_rlhf_finetuning.config import Step3Config, config_record
from utils import dist
from utils.ema import TrainableEMA
from utils.fs import WriteRefused, refused_write, replace_directories
from utils.run import final_save_refused

STAGING = ".final-models"  # <output_dir>/.final-models/<model>: the final models, built before they replace the old


def save_models(engine, tokenizer, cfg: Step3Config, summary: dict) -> None:
    """<output_dir>/actor, actor_ema (--enable_ema) and critic, all or none: each is built under
    <output_dir>/.final-models first, and only once all are built do they replace the old
    folders (fs.replace_directories). A write the disk refuses leaves every old folder as it
    was and ends in one line that says so and how to finish (--resume from the newest checkpoint)."""
    extra = {"training_config.json": config_record(cfg), "training_summary.json": summary}
    out = Path(cfg.output_dir)
    staging = out / STAGING
    models = {name: model for name, model in (("actor", engine.actor), ("actor_ema", engine.actor_ema),
                                               ("critic", engine.critic)) if model is not None}
    if dist.is_main():
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash while saving before
    try:
        for name, model in models.items():
            _stage(model, name, engine, tokenizer, staging, extra)
        if dist.is_main():
            replace_directories({staging / name: out / name for name in models})
    except WriteRefused as err:
        held = f"{', '.join(models)} in {out} hold what they held before (none was replaced)"
        raise final_save_refused(err, out, held, "the models") from err
    finally:
        if dist.is_main():
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def _stage(model, name: str, engine, tokenizer, staging: Path, extra: dict) -> None:
    try:
        with _exported(model, engine) as exported:
            # the EMA is averaged in fp32 and saved in the training dtype, like the actor
            engine.strategy.save_hf_model(exported, tokenizer, staging / name, extra_json=extra,
                                          dtype=engine.torch_dtype if name == "actor_ema" else None)
    except WriteRefused as err:  # name the model, not its staging folder
        if not isinstance(err.__cause__, OSError):
            raise
        raise refused_write(err.__cause__, f"the final {name} model") from err


@contextlib.contextmanager
def _exported(model, engine):
    """The engine to save for `model`: itself, or for an adapter EMA (TrainableEMA) the actor
    engine with the averaged adapters swapped in (and its own restored exactly afterwards), so
    the export merges W + scaling * B_ema @ A_ema as it merges the actor's own."""
    if not isinstance(model, TrainableEMA):
        yield model
        return
    with model.swapped_in():
        yield engine.actor
