"""OpenAI clients pointed at the AEX gateway with an agent's credential.

The credential is the token `aex agent create` / `aex agent rotate-token` saved in
`$AEX_HOME/credentials/<agent>` (default home `~/.aex`); the gateway port comes from
`$AEX_HOME/config.toml` (`[ports] envoy`, default 9000).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover - older Pythons
    tomllib = None


def _home(home: str | os.PathLike | None) -> Path:
    if home is not None:
        return Path(home)
    env = os.environ.get("AEX_HOME")
    return Path(env) if env else Path.home() / ".aex"


def gateway_url(home: str | os.PathLike | None = None) -> str:
    """The gateway's OpenAI base URL, e.g. `http://127.0.0.1:9000/v1`."""
    port = 9000
    cfg = _home(home) / "config.toml"
    if cfg.is_file():
        if tomllib is not None:
            port = int(tomllib.loads(cfg.read_text()).get("ports", {}).get("envoy", port))
        else:  # minimal fallback: `envoy = N` under [ports]
            section = None
            for line in cfg.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("["):
                    section = line.strip("[] ")
                elif section == "ports" and line.replace(" ", "").startswith("envoy="):
                    port = int(line.split("=", 1)[1])
    return f"http://127.0.0.1:{port}/v1"


# An agent name as the daemon accepts it (`ledger::validate_name`): never a path.
_AGENT_NAME = re.compile(r"(?!\.)(?!aex_)[A-Za-z0-9._-]{1,64}")


def _token(agent: str, home: str | os.PathLike | None) -> str:
    if not isinstance(agent, str) or not _AGENT_NAME.fullmatch(agent):
        raise ValueError(
            f"invalid agent name {agent!r}: 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.' or 'aex_'"
        )
    path = _home(home) / "credentials" / agent
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no AEX credential for agent {agent!r} at {path}; create the agent with "
            f"`aex agent create {agent} BUDGET_USD RPM` (or rotate its token)"
        ) from None
    if not token:
        raise ValueError(f"the AEX credential file {path} is empty")
    return token


def agent_env(agent: str, home: str | os.PathLike | None = None) -> dict[str, str]:
    """`OPENAI_BASE_URL` and `OPENAI_API_KEY` for frameworks configured through the environment."""
    # The OpenAI Agents SDK would upload traces to api.openai.com with the agent's token.
    return {
        "OPENAI_BASE_URL": gateway_url(home),
        "OPENAI_API_KEY": _token(agent, home),
        "OPENAI_AGENTS_DISABLE_TRACING": os.environ.get("OPENAI_AGENTS_DISABLE_TRACING", "1"),
    }


def get_openai_client(agent: str, home: str | os.PathLike | None = None, **kwargs):
    """An `openai.OpenAI` client for `agent`, governed by AEX. Extra kwargs go to the client."""
    import openai

    return openai.OpenAI(base_url=gateway_url(home), api_key=_token(agent, home), **kwargs)


def get_async_openai_client(agent: str, home: str | os.PathLike | None = None, **kwargs):
    """An `openai.AsyncOpenAI` client for `agent`, governed by AEX."""
    import openai

    return openai.AsyncOpenAI(base_url=gateway_url(home), api_key=_token(agent, home), **kwargs)
