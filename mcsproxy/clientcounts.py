"""What each client address holds (connections, table entries), with a cap per address:
one client must not take every slot of a limit it shares with the others."""

from __future__ import annotations

# Where a limit is shared by every client, one address may hold this fraction of it.
CLIENT_SHARE = 4


def client_share(limit: int) -> int:
    """The most one client address may hold of a shared `limit` (at least 1)."""
    return max(1, limit // CLIENT_SHARE)


class ClientCounts(dict[str, int]):
    """Client address → what it holds now; an address that holds nothing is not kept."""

    __slots__ = ()

    def take(self, client: str, cap: int) -> bool:
        """One more for `client`, unless it holds `cap` already (then False, nothing taken)."""
        held = self.get(client, 0)
        if held >= cap:
            return False
        self[client] = held + 1
        return True

    def give(self, client: str) -> int:
        """One fewer for `client`; what it still holds."""
        left = self.get(client, 1) - 1
        if left:
            self[client] = left
        else:
            self.pop(client, None)
        return left
