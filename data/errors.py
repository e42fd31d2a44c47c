"""The one error type of the data package: bad input reported as one readable line."""
from core.errors import UserError


class DataError(UserError):
    """A data problem (no shard matches, a corrupt set, an unparsable caption...) as a one-line message."""
