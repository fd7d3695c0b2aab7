"""Writing files so that an interrupted save never leaves a half-written file
under the real name (checkpoints, adapters, shards), and reading safetensors
files with errors that name the file."""
import contextlib
import os
import tempfile


def atomic_write(path: str, write) -> None:
    """Calls write(tmp) on a temporary file beside `path`, then renames it over
    `path`, so an interrupted save never leaves a half-written file under the
    real name."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


class CorruptFileError(ValueError):
    """A file on disk that cannot be parsed (truncated, corrupted or not the
    format its name says). The message names the file."""


@contextlib.contextmanager
def reading_safetensors(path: str, what: str = ""):
    """Turns safetensors' own errors raised inside the block (which say what is
    wrong with a file but not which file) into CorruptFileError naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise CorruptFileError(
            f"{what + ': ' if what else ''}{path} is not a valid safetensors file (truncated or corrupted?): {e}"
        ) from e
