"""The gateway's TLS client side: how it verifies ``https://`` neurons.

A neuron endpoint written ``https://`` is verified like any HTTPS server (certificate chain and
host name), against ``[neuron_tls] ca_file`` when set (a private cluster CA), else the system's
trust store. With ``certfile``/``keyfile`` the gateway presents a client certificate, for
neurons that require one (``[tls] client_ca_file`` in neuron.toml). Verification is never
switched off: a neuron whose certificate does not verify is down, with the reason in the log.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cortex.config import ConfigError, NeuronTls
from cortex.wire.server import config_path


def client_context(settings: NeuronTls, base_dir: Path) -> ssl.SSLContext | None:
    """The SSL context for calls to neurons; None when nothing is configured (the defaults of
    the HTTP client then apply: system trust store, no client certificate)."""
    if settings.ca_file is None and settings.certfile is None:
        return None
    try:
        context = ssl.create_default_context(
            cafile=config_path(settings.ca_file, base_dir) if settings.ca_file else None
        )
        if settings.certfile is not None and settings.keyfile is not None:
            context.load_cert_chain(
                config_path(settings.certfile, base_dir), config_path(settings.keyfile, base_dir)
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[neuron_tls]: cannot use the certificate files: {exc}") from None
    return context
