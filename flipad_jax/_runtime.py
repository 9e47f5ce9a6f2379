"""What every ``flipad`` run shares: the device choice, progress-bar policy and the run log.

* ``--device cpu|gpu|tpu`` picks JAX's platform before anything runs on a device (JAX reads
  ``jax_platforms`` once, when it first needs a backend); a platform JAX cannot start here is a
  clear error, not a silent fall-back to the CPU.
* Progress bars are drawn only when stderr is a terminal, unless ``--progress`` asks for them
  (a log file or CI output should not fill with bar redraws); a subcommand's ``--quiet`` turns
  them off.
* ``--log FILE`` appends the run's record: the command line, library versions, device, every
  message of the ``flipad`` logger (the lines a subcommand reports, at INFO), and how the run
  ended (exit status, the error). ``--verbose`` also shows those messages on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time

LOGGER = logging.getLogger("flipad")
DEVICES = ("cpu", "gpu", "tpu")


def select_device(device: str) -> str:
    """Make ``device`` JAX's platform; returns the first device's description."""
    import jax

    if device not in DEVICES:
        raise ValueError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    jax.config.update("jax_platforms", device)
    try:
        first = jax.devices()[0]
    except RuntimeError as error:
        raise ValueError(f"--device {device}: JAX cannot start a {device} backend here "
                         f"({error}); install the matching jax plugin or choose another "
                         "device") from None
    if first.platform != device:  # JAX had already started another backend in this process
        raise ValueError(f"--device {device}: JAX already runs on {first.platform} in this "
                         "process")
    return f"{first.platform}: {first.device_kind}"


def show_progress(args) -> bool:
    """Progress bars for this run: not with ``--quiet``; on a terminal, or with ``--progress``."""
    if getattr(args, "quiet", False):
        return False
    return bool(args.force_progress) or sys.stderr.isatty()


def report(message: str) -> None:
    """Print a subcommand's result line and record it in the run log."""
    print(message)
    LOGGER.info(message)


@contextlib.contextmanager
def run_log(args):
    """Attach the ``--log`` file and ``--verbose`` stderr handlers for one run; yields a dict
    the caller fills with ``status`` (and ``error``) for the closing record."""
    handlers = []
    if args.log is not None:
        try:
            handler = logging.FileHandler(args.log, encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--log {args.log}: cannot append to it ({error.strerror}): "
                             "expected a writable file path") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(handler)
    if args.verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        LOGGER.addHandler(handler)
    previous = LOGGER.level
    LOGGER.setLevel(logging.INFO if handlers else logging.WARNING)
    outcome: dict = {}
    start = time.perf_counter()
    try:
        if args.log is not None:
            from flipad_jax.detector_io import versions

            import jax

            LOGGER.info("command: %s", shlex.join(args.argv))
            LOGGER.info("versions: %s", versions())
            if args.jax_device is None:  # with --device, main logs the one it selected
                LOGGER.info("device: %s", jax.devices()[0])
        yield outcome
    finally:
        LOGGER.info("exit status %s after %.1f s%s", outcome.get("status"),
                    time.perf_counter() - start,
                    f": {outcome['error']}" if outcome.get("error") else "")
        for handler in handlers:
            LOGGER.removeHandler(handler)
            handler.close()
        LOGGER.setLevel(previous)
