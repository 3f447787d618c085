"""tim-ray: distributed training of Transition Models on Ray."""


def version() -> str:
    """The installed tim-ray's version; "unknown" in a checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("tim-ray")
    except PackageNotFoundError:
        return "unknown"
