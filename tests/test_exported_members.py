import types

import framework


def test_public_api_is_exactly_all():
    exported = {name for name, value in vars(framework).items()
                if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert exported - {"annotations", "TYPE_CHECKING"} == set(framework.__all__)
    assert framework.__all__ == sorted(framework.__all__)
