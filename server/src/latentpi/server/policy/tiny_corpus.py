"""A built-in corpus of LIBERO-like instructions for training the tiny test tokenizer.

The first lines are instructions of the four LIBERO evaluation suites; the rest are generated from
the same objects and places, so the tiny tokenizer learns whole words of the task vocabulary and
real LIBERO prompts tokenize into few pieces (as they do with PaliGemma's tokenizer).
"""

from __future__ import annotations

import itertools

_SUITE_INSTRUCTIONS = (
    # libero_spatial
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
    # libero_goal
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "put the wine bottle on top of the cabinet",
    "open the top drawer and put the bowl inside",
    "put the bowl on top of the cabinet",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
    "turn on the stove",
    "put the bowl on the plate",
    "put the wine bottle on the rack",
    # libero_10
    "put both the alphabet soup and the tomato sauce in the basket",
    "put both the cream cheese box and the butter in the basket",
    "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the white mug on the plate and put the chocolate pudding to the right of the plate",
    "put both the alphabet soup and the cream cheese box in the basket",
    "put both moka pots on the stove",
    "put the yellow and white mug in the microwave and close it",
)

_OBJECTS = (
    "alphabet soup",
    "cream cheese",
    "salad dressing",
    "bbq sauce",
    "ketchup",
    "tomato sauce",
    "butter",
    "milk",
    "chocolate pudding",
    "orange juice",
    "black bowl",
    "white mug",
    "red mug",
    "frying pan",
    "moka pot",
    "wine bottle",
    "book",
)

_PLACES = (
    "in the basket",
    "on the plate",
    "on the stove",
    "on top of the cabinet",
    "in the top drawer of the cabinet",
    "on the left plate",
    "on the right plate",
    "in the tray",
)

_OTHER = (
    "open the microwave",
    "close the top drawer of the cabinet",
    "turn off the stove",
    "KITCHEN SCENE3 turn on the stove and put the frying pan on it",
    "LIVING ROOM SCENE2 pick up the ketchup and put it in the basket",
    "Task 1: stack the 2 bowls, then wait.",
)


def libero_like_instructions() -> list[str]:
    """The tiny tokenizer's training sentences, in a fixed order (training is deterministic)."""
    generated = [
        f"{verb} the {obj} {place}"
        for verb, obj, place in itertools.product(("put", "place"), _OBJECTS, _PLACES)
    ]
    picked = [f"pick up the {obj} and place it {place}" for obj in _OBJECTS for place in _PLACES]
    return [*_SUITE_INSTRUCTIONS, *_OTHER, *generated, *picked]
