"""Command-line options every training script takes in the same form: checkpointing and experiment tracking."""

from __future__ import annotations

import argparse

from ..utils.validation import non_negative_int, positive_int
from .divergence import DEFAULT_MAX_SKIPPED_STEPS


def add_checkpointing_arguments(parser: argparse.ArgumentParser, checkpointing_steps: int) -> None:
    """`--checkpointing_steps`, `--checkpoints_total_limit` and `--resume_from_checkpoint`.

    Args:
        parser (`argparse.ArgumentParser`):
            The script's parser.
        checkpointing_steps (`int`):
            The default of `--checkpointing_steps` (optimizer steps between checkpoints).
    """
    parser.add_argument("--checkpointing_steps", type=positive_int, default=checkpointing_steps)
    parser.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="'latest' (newest complete checkpoint in --output_dir, or a fresh start) or a path.")


def add_divergence_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max_skipped_steps`: non-finite optimizer steps in a row that are skipped before the run stops (docs/divergence.md).

    Args:
        parser (`argparse.ArgumentParser`):
            The script's parser.
    """
    parser.add_argument("--max_skipped_steps", type=non_negative_int, default=DEFAULT_MAX_SKIPPED_STEPS,
                        help="Skip at most this many steps in a row whose loss or gradients are NaN/inf (no update, "
                        "no EMA update); the next one stops the run naming the last finite checkpoint.")


def add_tracking_arguments(parser: argparse.ArgumentParser, tracker_project_name: str) -> None:
    """Accelerate's trackers (`--report_to`, `--logging_dir`, `--tracker_project_name`) and the Hub upload
    (`--push_to_hub`, `--hub_model_id`, `--hub_token`).

    Args:
        parser (`argparse.ArgumentParser`):
            The script's parser.
        tracker_project_name (`str`):
            The default of `--tracker_project_name`.
    """
    parser.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--tracker_project_name", type=str, default=tracker_project_name)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)


def add_training_run_arguments(parser: argparse.ArgumentParser, checkpointing_steps: int, tracker_project_name: str) -> None:
    """Every option above, as each training script takes them: checkpointing, divergence, tracking and the Hub.

    Args:
        parser (`argparse.ArgumentParser`):
            The script's parser.
        checkpointing_steps (`int`):
            The default of `--checkpointing_steps`.
        tracker_project_name (`str`):
            The default of `--tracker_project_name`.
    """
    add_checkpointing_arguments(parser, checkpointing_steps)
    add_divergence_arguments(parser)
    add_tracking_arguments(parser, tracker_project_name)


__all__ = ["add_checkpointing_arguments", "add_divergence_arguments", "add_tracking_arguments", "add_training_run_arguments"]
