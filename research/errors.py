"""The one exception type for user errors (config, environment, data).

The CLI prints its message alone, without a traceback; the message names the
field or file at fault and how to fix it.
"""


class UserError(Exception):
  """A problem the user can fix: bad config, missing file, malformed data."""
