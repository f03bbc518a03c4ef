"""Training: one FSDP2 loop (trainer.py) shared by every method's entry point (inscp.py, transllm.py).

    from train import Trainer, TrainConfig, parse_args, session, run_main
"""
from train.config import TrainConfig, parse_args  # noqa: F401
from train.distributed import session  # noqa: F401
from train.errors import TrainError, TrainingDiverged  # noqa: F401
from train.trainer import Trainer, run_main  # noqa: F401
