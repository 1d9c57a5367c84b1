"""An offline prompt writer: compositional templates over objects, attributes, counts and relations.

It stands in for the LLM where none is available (``selma demo``, tests, a first try): for each
preset skill it fills a few sentence frames from fixed vocabularies. The result depends only on the
skill, the seed and the request index, so a run is reproducible and a resumed run continues the
same sequence. It is not a substitute for an LLM's variety — use it to exercise the pipeline.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# (singular, plural) everyday objects
OBJECTS = (
    ("apple", "apples"), ("backpack", "backpacks"), ("banana", "bananas"), ("basket", "baskets"),
    ("bench", "benches"), ("bicycle", "bicycles"), ("book", "books"), ("bottle", "bottles"), ("bowl", "bowls"),
    ("box", "boxes"), ("bucket", "buckets"), ("cactus", "cacti"), ("camera", "cameras"), ("candle", "candles"),
    ("chair", "chairs"), ("clock", "clocks"), ("cup", "cups"), ("cushion", "cushions"), ("drum", "drums"),
    ("envelope", "envelopes"), ("fork", "forks"), ("guitar", "guitars"), ("hat", "hats"), ("helmet", "helmets"),
    ("jar", "jars"), ("kettle", "kettles"), ("key", "keys"), ("kite", "kites"), ("ladder", "ladders"),
    ("lamp", "lamps"), ("lantern", "lanterns"), ("laptop", "laptops"), ("lemon", "lemons"), ("mug", "mugs"),
    ("notebook", "notebooks"), ("orange", "oranges"), ("paintbrush", "paintbrushes"), ("pear", "pears"),
    ("pencil", "pencils"), ("piano", "pianos"), ("pillow", "pillows"), ("plate", "plates"),
    ("potted plant", "potted plants"), ("pumpkin", "pumpkins"), ("radio", "radios"), ("rope", "ropes"),
    ("scarf", "scarves"), ("shoe", "shoes"), ("skateboard", "skateboards"), ("spoon", "spoons"),
    ("suitcase", "suitcases"), ("sunflower", "sunflowers"), ("surfboard", "surfboards"), ("teapot", "teapots"),
    ("tennis ball", "tennis balls"), ("tomato", "tomatoes"), ("toothbrush", "toothbrushes"),
    ("traffic cone", "traffic cones"), ("umbrella", "umbrellas"), ("vase", "vases"), ("violin", "violins"),
    ("watering can", "watering cans"), ("wheelbarrow", "wheelbarrows"), ("wine glass", "wine glasses"),
    ("candle holder", "candle holders"), ("donut", "donuts"), ("fire hydrant", "fire hydrants"),
    ("mailbox", "mailboxes"), ("park bench", "park benches"), ("sandwich", "sandwiches"),
    ("stop sign", "stop signs"), ("teddy bear", "teddy bears"), ("toaster", "toasters"),
    ("typewriter", "typewriters"), ("rubber duck", "rubber ducks"), ("globe", "globes"),
)
ANIMALS = (
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("cow", "cows"), ("sheep", "sheep"),
    ("goat", "goats"), ("duck", "ducks"), ("parrot", "parrots"), ("owl", "owls"), ("rabbit", "rabbits"),
    ("squirrel", "squirrels"), ("fox", "foxes"), ("deer", "deer"), ("pigeon", "pigeons"), ("goose", "geese"),
    ("turtle", "turtles"), ("hedgehog", "hedgehogs"), ("pig", "pigs"), ("donkey", "donkeys"),
    ("penguin", "penguins"), ("zebra", "zebras"), ("giraffe", "giraffes"), ("elephant", "elephants"),
    ("bear", "bears"), ("frog", "frogs"), ("chicken", "chickens"), ("swan", "swans"), ("llama", "llamas"),
)
PEOPLE = (
    "woman", "man", "child", "old man", "old woman", "chef", "cyclist", "student", "gardener", "nurse",
    "firefighter", "musician", "teenager", "baker", "painter", "fisherman", "mail carrier", "tourist",
    "skateboarder", "farmer", "waiter", "photographer", "jogger", "street vendor", "librarian", "carpenter",
)
PERSON_ACTIONS = (
    "reading a newspaper", "riding a bicycle", "carrying a stack of boxes", "painting a fence",
    "holding an umbrella", "pouring a cup of tea", "walking a dog", "waiting for a bus", "tying a shoelace",
    "taking a photograph", "playing a guitar", "eating an ice cream cone", "watering flowers",
    "flying a kite", "pushing a shopping cart", "sweeping the floor", "slicing a loaf of bread",
    "talking on a phone", "feeding pigeons", "repairing a bicycle", "stacking firewood", "juggling oranges",
    "sketching in a notebook", "hanging laundry", "carrying a surfboard", "selling fruit from a cart",
)
ANIMAL_ACTIONS = (
    "sleeping", "drinking water", "running", "looking at the camera", "sitting still", "eating grass",
    "playing with a ball", "standing in the shade", "lying on its side", "walking slowly", "jumping",
    "resting its head on its paws",
)
COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "grey", "brown",
          "teal", "golden", "silver", "navy", "beige", "maroon", "turquoise")
MATERIALS = ("wooden", "metal", "glass", "ceramic", "plastic", "paper", "stone", "leather", "wicker", "marble",
             "copper", "cotton", "woollen", "bamboo", "concrete", "velvet")
QUALITIES = ("small", "large", "tiny", "tall", "round", "square", "striped", "spotted", "shiny", "rusty",
             "old", "brand new", "cracked", "dusty", "polished", "battered", "folded", "half-empty")
PLACES = (
    "on a kitchen counter", "in a city park", "on a sandy beach", "by a rainy window", "on a wooden dock",
    "in a busy train station", "on a snowy mountain path", "in a flower garden", "on a cluttered desk",
    "in a quiet library", "on a farmhouse porch", "at a street market", "in a hotel lobby",
    "beside a country road", "on a balcony", "in a laundromat", "on a subway platform", "in a bakery",
    "in a forest clearing", "on a rooftop terrace", "in a school classroom", "next to a fountain",
    "on a picnic blanket", "in a garage workshop", "at a bus stop", "on a frozen lake", "in a greenhouse",
    "in a hospital corridor", "on a fishing boat", "in a parking lot", "under a bridge", "in a bathroom",
    "at an airport gate", "in a vegetable patch", "on a stone staircase", "in a small cafe", "in an attic",
    "on a tennis court", "in a museum hall", "beside a campfire",
)
TIMES = ("", "", "", " at sunset", " at night", " on a foggy morning", " in the rain", " at noon",
         " in winter", " under a cloudy sky", " in autumn", " at dawn")
RELATIONS = ("to the left of", "to the right of", "above", "below", "on top of", "under", "behind",
             "in front of", "inside", "next to", "leaning against", "hanging over")
COUNT_WORDS = ((1, "one"), (2, "two"), (3, "three"))
STYLES = ("oil painting", "watercolor", "digital art", "concept art", "charcoal sketch", "35mm photo",
          "studio photograph", "isometric illustration", "pixel art", "ink drawing", "low poly render",
          "children's book illustration", "vintage poster", "claymation still", "ukiyo-e print", "pastel drawing")
LIGHTING = ("soft morning light", "dramatic lighting", "golden hour", "neon glow", "volumetric light",
            "candlelight", "overcast light", "rim lighting", "moonlight", "harsh midday sun", "studio lighting")
DETAILS = ("highly detailed", "intricate details", "sharp focus", "8k", "4k", "trending on an art forum",
           "muted colors", "vibrant colors", "film grain", "shallow depth of field", "wide angle",
           "symmetrical composition", "cinematic", "octane render", "matte painting", "bokeh", "high contrast",
           "soft pastel palette", "award winning", "ultra realistic")
MOODS = ("peaceful", "mysterious", "cozy", "eerie", "whimsical", "melancholic", "epic", "cheerful", "lonely",
         "dreamy")
SETTINGS = ("an abandoned greenhouse", "a floating island", "a flooded city street", "a crystal cave",
            "a busy night market", "a snowy village", "a desert canyon", "an underwater ruin", "a rooftop garden",
            "a misty bamboo forest", "a steampunk workshop", "a quiet harbor", "a sunflower field",
            "a candlelit library", "a volcanic beach", "a space station window")
WRONG_MATERIALS = ("made of ice", "made of bread", "made of jelly", "made of feathers", "made of cheese",
                   "made of glass", "knitted from wool", "made of sand", "made of chocolate", "made of paper")
TINY_CONTAINERS = ("a teacup", "a light bulb", "a wine glass", "a matchbox", "a thimble", "a jam jar",
                   "a soap bubble", "an eggshell")
HOT_PLACES = ("a sunny desert", "a tropical beach", "a sauna", "a volcano crater", "a summer cornfield")
COLD_THINGS = ("snowman", "igloo", "ice sculpture", "frozen waterfall", "penguin colony")
HUMAN_ACTIVITIES = ("reading a newspaper", "riding a bicycle", "playing chess", "typing on a laptop",
                    "brushing its teeth", "driving a tractor", "lifting weights", "knitting a scarf",
                    "conducting an orchestra", "ironing a shirt", "paying at a cash register", "taking a selfie")
WRONG_PLACES = ("in the middle of a highway", "on the roof of a bus", "at the bottom of a swimming pool",
                "inside a washing machine", "on a supermarket shelf", "in an office meeting room",
                "on a church altar", "inside a refrigerator")
SURFACES = ("wooden sign", "coffee mug", "birthday cake", "t-shirt", "chalkboard", "neon sign", "street sign",
            "shop window", "paper bag", "book cover", "banner", "license plate", "cereal box", "doormat",
            "baseball cap", "cardboard box", "billboard", "laptop sticker")
TEXT_VERBS = ("reading", "that says", "with the words", "printed with", "showing the text", "labelled")
TEXT_FIRST = ("FRESH", "OPEN", "HAPPY", "BIG", "SLOW", "FREE", "HOT", "GOOD", "BEST", "LOST", "NO",
              "SWEET", "DAILY", "LAST", "NEW", "TINY")
TEXT_SECOND = ("EGGS", "LATE", "BIRTHDAY", "SALE", "DOWN", "COFFEE", "BREAD", "MORNING", "TACOS", "CAT",
               "PARKING", "DREAMS", "NEWS", "CHANCE", "BOOKS", "GARDEN", "SOUP", "PIZZA")


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", '"')) else ".")


def _attribute(rng: random.Random) -> str:
    return rng.choice((rng.choice(COLORS), rng.choice(MATERIALS), rng.choice(QUALITIES),
                       f"{rng.choice(QUALITIES)} {rng.choice(COLORS)}"))


def _everyday_objects(rng: random.Random) -> str:
    frame = rng.randrange(4)
    if frame == 0:
        return _sentence(f"{_article(_attribute(rng) + ' ' + rng.choice(OBJECTS)[0])} {rng.choice(PLACES)}"
                         f"{rng.choice(TIMES)}")
    if frame == 1:
        return _sentence(f"{_article(rng.choice(PEOPLE))} {rng.choice(PERSON_ACTIONS)} {rng.choice(PLACES)}"
                         f"{rng.choice(TIMES)}")
    if frame == 2:
        count, word = rng.choice(COUNT_WORDS)
        animal = rng.choice(ANIMALS)
        subject = _article(animal[0]) if count == 1 else f"{word} {animal[1]}"
        return _sentence(f"{subject} {rng.choice(ANIMAL_ACTIONS)} {rng.choice(PLACES)}")
    first, second = rng.sample(OBJECTS, 2)
    return _sentence(f"{_article(rng.choice(COLORS) + ' ' + first[0])} and {_article(second[0])} "
                     f"{rng.choice(PLACES)}{rng.choice(TIMES)}")


def _paragraph_captions(rng: random.Random) -> str:
    opening = rng.choice(("In this picture I can see", "This image shows", "Here we can see",
                          "In this image there is", "I can see"))
    place = rng.choice(PLACES)
    first = _article(f"{_attribute(rng)} {rng.choice(OBJECTS)[0]}")
    sentences = [f"{opening} {first} {place}."]
    for _ in range(rng.randint(1, 2)):
        position = rng.choice(("In the front", "On the left side", "On the right side", "In the middle",
                               "Behind it", "At the top", "At the bottom", "Beside it"))
        frame = rng.randrange(3)
        if frame == 0:
            count, word = rng.choice(COUNT_WORDS[1:])
            sentences.append(f"{position} there are {word} {rng.choice(COLORS)} {rng.choice(OBJECTS)[1]}.")
        elif frame == 1:
            sentences.append(f"{position} {_article(rng.choice(PEOPLE))} is {rng.choice(PERSON_ACTIONS)}.")
        else:
            animal = rng.choice(ANIMALS)[0]
            sentences.append(f"{position} I can see {_article(animal)} {rng.choice(ANIMAL_ACTIONS)}.")
    sentences.append(rng.choice(("In the background there are trees and a cloudy sky.",
                                 "In the background I can see a wall with a few posters.",
                                 "The background is blurry.", "At the top of the image there are lights.",
                                 "In the background there are buildings and poles.",
                                 "Behind them there is a fence and some plants.")))
    return " ".join(sentences)


def _detailed_prompts(rng: random.Random) -> str:
    subject = rng.choice((
        lambda: f"{_article(rng.choice(MOODS))} {rng.choice(ANIMALS)[0]} {rng.choice(ANIMAL_ACTIONS)}",
        lambda: f"portrait of {_article(rng.choice(PEOPLE))} {rng.choice(PERSON_ACTIONS)}",
        lambda: f"{_article(rng.choice(MATERIALS))} {rng.choice(OBJECTS)[0]} in {rng.choice(SETTINGS)}",
        lambda: f"{rng.choice(SETTINGS)} at {rng.choice(('dusk', 'dawn', 'midnight', 'noon'))}",
    ))()
    modifiers = [rng.choice(STYLES), rng.choice(LIGHTING), *rng.sample(DETAILS, rng.randint(2, 4))]
    rng.shuffle(modifiers)
    return ", ".join([subject, *modifiers])


def _counting(rng: random.Random) -> str:
    count, word = rng.choice(COUNT_WORDS)
    thing = rng.choice(OBJECTS + ANIMALS)
    attribute = rng.choice((rng.choice(COLORS), rng.choice(MATERIALS), rng.choice(QUALITIES), ""))
    subject = (rng.choice(("a single", "one", "exactly one")) + f" {attribute} {thing[0]}" if count == 1
               else f"{rng.choice((word, 'exactly ' + word))} {attribute} {thing[1]}")
    if rng.random() < 0.35:
        other_count, other_word = rng.choice(COUNT_WORDS)
        other = rng.choice(OBJECTS)
        subject += f" and {other_word} {other[0] if other_count == 1 else other[1]}"
    return _sentence(f"{subject} {rng.choice(PLACES)}{rng.choice(TIMES)}")


def _commonsense_defying(rng: random.Random) -> str:
    frame = rng.randrange(5)
    if frame == 0:
        return _sentence(f"{_article(rng.choice(ANIMALS)[0])} {rng.choice(HUMAN_ACTIVITIES)} {rng.choice(PLACES)}"
                         f"{rng.choice(TIMES)}")
    if frame == 1:
        return _sentence(f"{_article(rng.choice(OBJECTS)[0])} {rng.choice(WRONG_MATERIALS)} {rng.choice(PLACES)}")
    if frame == 2:
        return _sentence(f"{_article(rng.choice(QUALITIES) + ' ' + rng.choice(COLD_THINGS))} "
                         f"{rng.choice(('standing', 'melting slowly', 'sparkling', 'untouched by the heat'))} "
                         f"in {rng.choice(HOT_PLACES)}{rng.choice(TIMES)}")
    if frame == 3:
        return _sentence(f"{_article(rng.choice(ANIMALS)[0])} {rng.choice(ANIMAL_ACTIONS)} inside "
                         f"{rng.choice(TINY_CONTAINERS)} {rng.choice(PLACES)}")
    return _sentence(f"{_article(rng.choice(('grand piano', 'bathtub', 'sofa', 'bed', 'grandfather clock')))} "
                     f"{rng.choice(WRONG_PLACES)}{rng.choice(TIMES)}")


def _spatial_relations(rng: random.Random) -> str:
    first, second, third = rng.sample(OBJECTS + ANIMALS, 3)
    text = f"{_article(_attribute(rng) + ' ' + first[0])} {rng.choice(RELATIONS)} {_article(second[0])}"
    if rng.random() < 0.4:
        text += f", with {_article(third[0])} {rng.choice(RELATIONS)} it"
    else:
        text += f" {rng.choice(PLACES)}"
    return _sentence(text)


def _attribute_binding(rng: random.Random) -> str:
    first, second = rng.sample(OBJECTS, 2)
    color_a, color_b = rng.sample(COLORS, 2)
    material_a, material_b = rng.sample(MATERIALS, 2)
    frame = rng.randrange(3)
    if frame == 0:
        text = (f"{_article(f'{color_a} {material_a} {first[0]}')} next to "
                f"{_article(f'{color_b} {material_b} {second[0]}')}")
    elif frame == 1:
        quality_a, quality_b = rng.sample(QUALITIES, 2)
        text = (f"{_article(f'{quality_a} {color_a} {first[0]}')} and {_article(f'{quality_b} {color_b} {second[0]}')}"
                f" {rng.choice(PLACES)}")
    else:
        text = (f"{_article(f'{color_a} {first[0]}')} with {_article(f'{material_b} handle')} beside "
                f"{_article(f'{color_b} {second[0]}')}")
    return _sentence(text)


def _text_rendering(rng: random.Random) -> str:
    words = f"{rng.choice(TEXT_FIRST)} {rng.choice(TEXT_SECOND)}"
    if rng.random() < 0.3:
        words = words.title()
    surface = _article(f"{rng.choice((rng.choice(COLORS), rng.choice(MATERIALS), ''))} {rng.choice(SURFACES)}".strip())
    return _sentence(f'{surface} {rng.choice(TEXT_VERBS)} "{words}" {rng.choice(PLACES)}')


WRITERS: dict[str, Callable[[random.Random], str]] = {
    "everyday_objects": _everyday_objects,
    "paragraph_captions": _paragraph_captions,
    "detailed_prompts": _detailed_prompts,
    "counting": _counting,
    "commonsense_defying": _commonsense_defying,
    "spatial_relations": _spatial_relations,
    "attribute_binding": _attribute_binding,
    "text_rendering": _text_rendering,
}


def template_prompts(skill: str, seed: int, request_index: int, count: int) -> list[str]:
    """``count`` prompts for ``skill``; the same arguments give the same prompts on every machine."""
    if skill not in WRITERS:
        raise ValueError(f"backend 'template' writes prompts for the preset skills only ({', '.join(WRITERS)}), "
                         f"not {skill!r}; use the openai or transformers backend for a custom skill")
    rng = random.Random(f"selma-template/{skill}/{seed}/{request_index}")  # str seeds hash with SHA-512
    return [WRITERS[skill](rng) for _ in range(count)]
