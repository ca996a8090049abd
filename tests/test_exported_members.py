import framework


def test_public_api_is_exactly_all():
    exported = {name for name in dir(framework) if not name.startswith("_")}
    modules = {"errors", "spec"}  # submodules imported by __init__ itself
    assert exported - modules - {"annotations", "TYPE_CHECKING"} == set(framework.__all__)
    assert framework.__all__ == sorted(framework.__all__)
