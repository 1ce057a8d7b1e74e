"""Reading a small text file (a config, a hostfile) as UTF-8, with one line for what went wrong."""


class TextFileError(ValueError):
    """The file cannot be read, or is not UTF-8; str(e) says which, without the path (the caller names it)."""


def read_utf8(path: str) -> str:
    """The whole file as text. Decoded whole (the files are small), so a bad byte's offset is the file's."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise TextFileError(e.strerror) from None
    except UnicodeDecodeError as e:
        raise TextFileError(f"not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
