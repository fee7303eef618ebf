"""The uvicorn options every cortex listener shares: header limits and TLS.

``cortex serve`` (API and metrics ports) and ``neuron run`` build their ``uvicorn.Config`` with
:func:`listener_options`, so a limit or a certificate option cannot be forgotten on one of them.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from cortex.config import ServerTls
from cortex.wire.guard import guarded_protocol


def config_path(value: str, base_dir: Path) -> str:
    """A path from a config file: ``~`` expanded, relative to the file's folder."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def listener_options(
    *,
    header_timeout: float,
    max_header_bytes: int,
    tls: ServerTls | None = None,
    base_dir: Path = Path("."),
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: the guarded HTTP protocol
    (:mod:`cortex.wire.guard`) and, when ``tls`` is on, uvicorn's certificate options."""
    options: dict[str, Any] = {"http": guarded_protocol(header_timeout, max_header_bytes)}
    if tls is not None and tls.enabled:
        assert tls.certfile is not None and tls.keyfile is not None
        options["ssl_certfile"] = config_path(tls.certfile, base_dir)
        options["ssl_keyfile"] = config_path(tls.keyfile, base_dir)
        if tls.client_ca_file is not None:
            options["ssl_ca_certs"] = config_path(tls.client_ca_file, base_dir)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def scheme(tls: ServerTls | None) -> str:
    return "https" if tls is not None and tls.enabled else "http"
