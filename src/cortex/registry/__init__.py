"""An HF-compatible model registry: serves a directory of repos over the Hugging Face wire format.

``huggingface_hub`` (``HfApi.model_info``, ``hf_hub_download``, ``snapshot_download``) works
against it unchanged, which makes it both the registry every cortex test downloads from and a
real mirror for air-gapped fleets (``cortex registry serve DIR``). See docs/registry.md.
"""

from cortex.registry.app import RegistryState, create_app
from cortex.registry.store import MAIN, RepoStore, revision_dir_name

__all__ = ["MAIN", "RegistryState", "RepoStore", "create_app", "revision_dir_name"]
