"""Tools for tests/engine/test_episode_tools.py, as a user writes them for --rollout.tools."""
COLORS = {"cat": "blue", "dog": "red"}


def lookup(noun: str) -> str:
    """The colour of a thing in this world.

    Args:
        noun: the thing, one word
    """
    return f"the {noun} was {COLORS[noun]}"


def add(a: int, b: int) -> int:
    """Adds two numbers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def undocumented(x):
    return x
