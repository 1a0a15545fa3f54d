"""Names and sizes fixed by the ABAW EMI task and the paper."""

#: The six EMI targets, in the order of the challenge's label files.
EMOTIONS: tuple[str, ...] = (
    "Admiration",
    "Amusement",
    "Determination",
    "Empathic Pain",
    "Excitement",
    "Joy",
)

#: Modalities served by the feature store, in fusion order.
MODALITIES: tuple[str, ...] = ("visual", "audio", "text")

#: Every clip's feature sequence is pooled to this many time steps.
STEPS: int = 128

#: Name of the id column in ABAW label files.
ID_COLUMN: str = "Filename"
