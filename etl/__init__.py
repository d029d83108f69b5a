"""chatsync: Green-API getChats -> SQL sync daemon."""

__version__ = "0.1.0"
USER_AGENT = f"chatsync/{__version__} (+https://github.com/chatsync/chatsync)"

__all__ = ["USER_AGENT", "__version__"]
