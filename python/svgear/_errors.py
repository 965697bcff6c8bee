"""svgear's exceptions: each is also the matching built-in, so callers may catch either."""


class Error(Exception):
    """Base of every exception svgear raises with a message from the library."""


class SvgearValueError(Error, ValueError):
    """A bad value: shape, budget, option, NaN input."""


class SvgearTypeError(Error, TypeError):
    """A bad kind of thing: dtype, device, tensor rank, an object without __dlpack__."""


class SvgearRuntimeError(Error, RuntimeError):
    """The library or the GPU failed on valid input."""


class SvgearMemoryError(Error, MemoryError):
    """Out of host or device memory."""


# svgear_status codes of include/svgear/svgear.h -> exception type.
BY_STATUS = {1: SvgearValueError, 2: SvgearTypeError, 3: SvgearRuntimeError, 4: SvgearMemoryError}
