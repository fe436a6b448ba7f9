"""Helpers for agents behind the AEX gateway. See `aex.integrations`."""

from .integrations import agent_env, gateway_url, get_async_openai_client, get_openai_client

__all__ = ["agent_env", "gateway_url", "get_async_openai_client", "get_openai_client"]
