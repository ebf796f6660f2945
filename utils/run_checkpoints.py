"""The checkpoint policy of a training loop (Steps 1, 2 and DPO through training/skeleton.py,
Step 3's rounds): where to start (--resume), when to save (--save_steps, a stop signal, the end).
How a checkpoint is written and read is utils/checkpoint.py."""
from __future__ import annotations

import shutil

from utils import checkpoint, dist
from utils.fs import WriteRefused, refused, refused_write
from utils.stopping import StopRequest
from utils.strategy import DeepSpeedStrategy


class RunCheckpoints:
    """The checkpoint policy (see the module docstring) of one run's `engines`."""

    def __init__(self, strategy: DeepSpeedStrategy, engines: dict, cfg, name: str, say):
        self.strategy, self.engines, self.cfg, self.name, self.say = strategy, engines, cfg, name, say
        self.every = cfg.save_steps

    def start(self, logger):
        """(LoopState, resumed): the newest checkpoint's state with --resume, else a fresh one."""
        resume = self.cfg.resume
        folder = checkpoint.latest(self.cfg.output_dir) if resume else None
        if folder is None:
            if not resume:  # --overwrite_output_dir: another run's checkpoints must not be resumed into
                self._forget_previous_run()
            logger.truncate_after(-1)  # a fresh start: no earlier run's or attempt's log lines
            for engine in self.engines.values():  # what a resumed run loads
                self.strategy.create_optimizer_state(engine)
            return checkpoint.LoopState(), False
        state = checkpoint.load(self.strategy, self.engines, folder)
        logger.truncate_after(state.step)
        self.say(f"resumed from {folder} (step {state.step}, epoch {state.epoch}, "
                 f"{state.batches_done} batches in)")
        return state, True

    def _forget_previous_run(self) -> None:
        """A fresh run in a folder that holds another run's checkpoints (--overwrite_output_dir,
        no --resume): remove them, so that a later --resume cannot continue the other run."""
        folder = checkpoint.root(self.cfg.output_dir)
        ours = sorted([*folder.glob("step-*"), *folder.glob(".tmp-step-*")]) if folder.is_dir() else []
        if dist.is_main() and ours:
            for old in ours:  # only what checkpoint.save writes: a user's own files there stay
                shutil.rmtree(old)
            self.say(f"{self.name}: removed the previous run's {len(ours)} checkpoint folder(s) from "
                     f"{folder} (--overwrite_output_dir)")
        dist.barrier()

    def save(self, state) -> None:
        try:
            folder = checkpoint.save(self.strategy, self.engines, state, self.cfg.output_dir,
                                     keep=self.cfg.save_total_limit)
        except OSError as err:
            if not refused(err):
                raise
            torn = checkpoint.root(self.cfg.output_dir) / f".tmp-step-{state.step:08d}"
            if dist.is_main():  # free what the torn attempt took; complete checkpoints are untouched
                shutil.rmtree(torn, ignore_errors=True)
            newest = checkpoint.latest(self.cfg.output_dir)
            left = (f"the newest complete checkpoint, {newest}, is intact (rerun with --resume once there "
                    "is room)" if newest else "no complete checkpoint was saved before")
            raise WriteRefused(f"{refused_write(err, f'the step {state.step} checkpoint')}; {left}") from err
        self.say(f"{self.name} checkpoint: {folder}")

    def after_step(self, state, stop: StopRequest, progress) -> None:
        """Save when --save_steps is due or a signal arrived; after a signal, exit cleanly."""
        stopping = stop.requested()
        if (self.every and state.step % self.every == 0) or stopping:
            self.save(state)
        if stopping:
            progress.close()
            self.say(f"{self.name}: stopped by signal at step {state.step}; rerun with --resume to continue")
            raise SystemExit(128 + (stop.signal or 15))

    def at_end(self, state) -> None:
        if self.every and state.step % self.every:  # unless the last step has just saved
            self.save(state)
