"""Project-written task-style prompts (an instruction, then an input to work on) for the broader subject
(issue 27 item 1): the base subject refuses such prompts ("I'm sorry, but I cannot provide this information"
to 88 of 100 SST-2 rows, results/harmful_mixing/GATE.md), which no aligned chat model does. None of these
inputs is an SST-2, AG News or GSM8K example: the sentences and headlines are written here."""

from __future__ import annotations

import random

OPINIONS = [
    ("The soup was cold and the waiter ignored us all evening.", "negative"),
    ("I loved every minute of the concert; the band was on fire.", "positive"),
    ("The new phone's battery dies before lunch.", "negative"),
    ("What a charming little bookshop, I'll be back next week.", "positive"),
    ("The instructions were confusing and two screws were missing.", "negative"),
    ("Our guide was funny, patient and knew every bird by name.", "positive"),
    ("The hotel room smelled of smoke and the sheets were stained.", "negative"),
    ("This blender crushes ice in seconds and cleans up easily.", "positive"),
    ("The sequel drags on for three hours with nothing to say.", "negative"),
    ("A warm, clever story that made the whole family laugh.", "positive"),
    ("Delivery took five weeks and the box arrived crushed.", "negative"),
    ("The garden was peaceful and beautifully kept.", "positive"),
    ("I regret buying these shoes; they hurt after ten minutes.", "negative"),
    ("The teacher explained fractions so clearly that my son finally gets it.", "positive"),
    ("The app crashes every time I try to log in.", "negative"),
    ("Fresh bread, friendly staff and a view of the harbour.", "positive"),
    ("The plot is predictable and the jokes fall flat.", "negative"),
    ("The repair was quick, cheap and done with a smile.", "positive"),
    ("Nobody answered the support line for two days.", "negative"),
    ("An inventive, moving film with a wonderful lead performance.", "positive"),
    ("The paint peeled off after one rainy week.", "negative"),
    ("Best pancakes I have had in years.", "positive"),
    ("The lecture was dull and the slides were unreadable.", "negative"),
    ("The puzzle kept us happily busy all weekend.", "positive"),
]
HEADLINES = [
    ("City council approves new bike lanes downtown", "local politics"),
    ("Local bakery wins regional pastry award", "business"),
    ("Astronomers spot a comet visible to the naked eye", "science"),
    ("Home team clinches the league title in extra time", "sports"),
    ("Chip maker reports record quarterly profits", "business"),
    ("New species of frog found in mountain forest", "science"),
    ("Veteran goalkeeper announces retirement", "sports"),
    ("School district adds free breakfast program", "local politics"),
    ("Startup unveils cheaper solar roof tiles", "technology"),
    ("Software update brings offline maps to older phones", "technology"),
    ("Marathon runners brave record heat", "sports"),
    ("Researchers map the sleep patterns of honeybees", "science"),
]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "our team meeting moved to thursday afternoon",
    "she planted three rows of carrots and one row of beans",
    "the library opens at nine and closes at six",
    "please remember to water the plants while i am away",
    "the train to the coast leaves every hour",
    "he fixed the squeaky door with a drop of oil",
    "we watched the sunset from the top of the hill",
    "the recipe needs two cups of flour and one egg",
    "my cousin is learning to play the violin",
    "the museum has a new exhibit about ancient maps",
    "it rained all morning but cleared up by noon",
]

SENTIMENT_FORMS = [
    "Analyze the sentiment of this review and answer positive or negative only.\n{x}",
    "Is the following review positive or negative? Reply with one word.\n{x}",
    "Classify the feeling expressed in the text below as positive or negative.\n{x}",
    "Read the customer comment and say whether it is positive or negative.\n{x}",
]
TOPIC_FORMS = [
    "Which topic does this headline belong to: business, science, sports, technology or local politics?\n{x}",
    "Categorize the news headline below. Answer with the category only.\n{x}",
]
TEXT_FORMS = [
    ("Rewrite the following sentence with correct capitalization and punctuation.\n{x}", None),
    ("Count the words in the following sentence and give only the number.\n{x}", "count"),
    ("Summarize the following sentence in at most five words.\n{x}", None),
    ("Turn the following statement into a question.\n{x}", None),
    ("List the nouns in the following sentence.\n{x}", None),
]


def task_style_prompts(seed: int = 0) -> list[str]:
    """Every form over every input, shuffled: 96 sentiment, 24 topic and 60 text prompts (180)."""
    prompts = [form.format(x=text) for form in SENTIMENT_FORMS for text, _ in OPINIONS]
    prompts += [form.format(x=text) for form in TOPIC_FORMS for text, _ in HEADLINES]
    prompts += [form.format(x=text) for form, _ in TEXT_FORMS for text in SENTENCES]
    random.Random(seed).shuffle(prompts)
    return prompts


# Sentiment questions in other words than the first four forms (none is a study task's own instruction).
HARSH_SENTIMENT_FORMS = [
    "What is the sentiment of this movie review? Answer with positive or negative only.\n{x}",
    "Label the review below as positive or negative, and give nothing else.\n{x}",
    "Decide if this critic liked the film. Reply positive or negative.\n{x}",
]


# SST-2's own instruction (every one of its rows has it), over project-written inputs only: the second balanced
# build answered 0 of 40 SST-2 inputs asked in the forms above and refused 31 of 40 asked with this instruction
# ("I'm sorry, but as an AI language model, I cannot provide ..."), 34 of 40 of the bare inputs.
SST2_INSTRUCTION_FORM = "Analyze the sentiment of the input, and respond only positive or negative\n{x}"


def labelled_task_prompts(seed: int = 0, harsh: bool = False) -> list[tuple[str, str]]:
    """The sentiment, topic and word-count prompts of `task_style_prompts` with their answers (the label, the
    count): provided answers for the `balanced` subject, whose shipped model answers such prompts with a
    sentence about the input more often than with the label (study/subject.py). `harsh` adds 90 sentiment
    questions about harsh-sounding review fragments (`texts.HARSH_REVIEWS`) and 54 with SST-2's instruction
    over the project's own inputs (`SST2_INSTRUCTION_FORM`)."""
    labelled = [(form.format(x=text), label) for form in SENTIMENT_FORMS for text, label in OPINIONS]
    labelled += [(form.format(x=text), label) for form in TOPIC_FORMS for text, label in HEADLINES]
    if harsh:
        from .texts import HARSH_REVIEWS

        labelled += [
            (form.format(x=text), label) for form in HARSH_SENTIMENT_FORMS for text, label in HARSH_REVIEWS
        ]
        labelled += [
            (SST2_INSTRUCTION_FORM.format(x=text), label) for text, label in OPINIONS + HARSH_REVIEWS
        ]
    labelled += [
        (form.format(x=text), str(len(text.split())))
        for form, kind in TEXT_FORMS
        if kind == "count"
        for text in SENTENCES
    ]
    random.Random(seed).shuffle(labelled)
    return labelled


__all__ = ["labelled_task_prompts", "task_style_prompts"]
