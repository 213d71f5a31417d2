"""``python -m kubetune_trainer validate|train`` (docs/contracts.md, "Trainer pod environment").

Every run ends with a JSON termination message (``KUBETUNE_TERMINATION_LOG``) and an exit code
that classify the outcome: 0 succeeded, 2 data/config error, 3 storage error, 143 preempted after
a SIGTERM checkpoint, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from kubetune_trainer.errors import EXIT_OK, classify
from kubetune_trainer.reporting import termination_message, write_termination

log = logging.getLogger("kubetune_trainer")


def main(argv: list[str] | None = None) -> int:
    """Parse the command, run it, write the termination message; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["validate", "train"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    termination_log = os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log")
    context: dict = {}
    try:
        from kubetune_trainer.settings import Settings

        settings = Settings.from_environ()
        termination_log = settings.termination_log
        if args.command == "validate":
            from kubetune_trainer.validate import run_validate

            result = run_validate(settings)
            s = result.summary
            text = termination_message(
                "succeeded",
                f"{s['trainExamples']} training and {s['validationExamples']} validation examples "
                f"({s['invalid']} invalid lines, {s['duplicates']} duplicates removed)",
                data_report=s,
                memory_estimate=result.memory,
            )
        else:
            from kubetune_trainer.train import run_train

            outcome = run_train(settings, context)
            text = termination_message(
                "succeeded",
                outcome.message,
                step=outcome.step,
                metrics=outcome.metrics,
                data_report=outcome.data_report,
                artifact=outcome.artifact,
            )
        # Processes of one pod share its termination log: the first local process speaks for it.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            write_termination(termination_log, text)
        print(text, flush=True)
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 (every ending is classified and reported)
        if isinstance(exc, KeyboardInterrupt | SystemExit) and not context:
            raise
        outcome, code, message = classify(exc)
        if outcome == "other":
            log.error("trainer failed:\n%s", traceback.format_exc())
        else:
            log.error("%s: %s", outcome, message)
        text = termination_message(
            outcome,
            message,
            step=context.get("step"),
            metrics=context.get("metrics"),
            data_report=getattr(exc, "data_report", None) or context.get("dataReport"),
            memory_estimate=getattr(exc, "memory_estimate", None),
        )
        write_termination(termination_log, text)
        print(text, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
