"""The one home of DeepSpeed (see deepspeed_strategy.py)."""
from utils.strategy.deepspeed_strategy import DeepSpeedStrategy, TrainSpec

__all__ = ["DeepSpeedStrategy", "TrainSpec"]
