"""A small Kubernetes API server emulator for tests that drive the real kubernetes_asyncio client.

    async with KubeEmulator() as emu, emu.api_client() as api:
        await CoreV1Api(api).create_namespaced_service("default", {...})
"""

from .server import KubeEmulator, Request
from .store import ApiError, ResourceType

__all__ = ["ApiError", "KubeEmulator", "Request", "ResourceType"]
