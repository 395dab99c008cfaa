"""The 29 classes of the ASL Alphabet dataset and which of them look alike."""

# torchvision's ImageFolder sorts folder names, so upper-case letters come before
# del/nothing/space: index 26 is "del", exactly as in the seed notebook.
ASL_CLASSES: tuple[str, ...] = tuple([chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["del", "nothing", "space"])

# (true, predicted) pairs the seed notebook saw confused; reported for every trial.
WATCH_PAIRS: tuple[tuple[str, str], ...] = (("U", "R"), ("R", "U"), ("K", "V"), ("V", "K"))

# Letters whose handshapes differ by one detail (crossing, spread, thumb, orientation).
LOOKALIKE_GROUPS: tuple[frozenset[str], ...] = (
    frozenset("RUVKHW"),
    frozenset("ASTMNEO"),
    frozenset("KP"),
    frozenset("GQ"),
    frozenset("IJY"),
    frozenset("DXZG"),
    frozenset("CO"),
    frozenset("FW"),
)


def is_lookalike(true: str, pred: str) -> bool:
    """True when `true` and `pred` share a look-alike group."""
    return any(true in g and pred in g for g in LOOKALIKE_GROUPS)
