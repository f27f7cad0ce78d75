"""Small helpers for what the Dagster UI shows.

Dagster renders markdown metadata (`MetadataValue.md`) with base64 `data:` images allowed
(dagster-io/dagster#13443, the way its own tutorial shows a plot), so embedding the PNG in the
report's markdown makes the plot visible in the UI, where `MetadataValue.path` is only text.
"""

from __future__ import annotations

import base64
from pathlib import Path

# Dagster stores metadata in its event log (SQLite by default) and sends it to every browser that
# opens the asset: refuse to inline big images rather than bloat both.
MAX_EMBED_BYTES = 2_000_000
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embed_png_markdown(path: str | Path, alt: str = "plot", max_bytes: int = MAX_EMBED_BYTES) -> str:
    """Markdown for the PNG at `path` inlined as a data URI: ``![alt](data:image/png;base64,...)``.

    Raises ValueError if the file is not a PNG or is larger than `max_bytes`.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ValueError(f"{path} is not a PNG file")
    if len(data) > max_bytes:
        raise ValueError(f"{path} is {len(data)} bytes, over the {max_bytes} bytes allowed inline; "
                         "link it with MetadataValue.path instead")
    alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"
