"""A scripted stand-in for input(): types the given lines (or raises the given exceptions), then Ctrl-D."""


def scripted(lines):
    queue = list(lines)

    def read(prompt):
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read
