"""Build the verse-aligned Bible corpora used to train and evaluate minibild.

Both pairs have the World English Bible (SWORD module engWEB2015eb) as the reference:
  es-en    source Reina-Valera 1909 (spaRV1909eb), Spanish: writes data/{train,dev,test}.jsonl
  kjv-web  source King James Version (engKJV2006eb), archaic English: writes data/kjv-web/
All three texts are public domain. One verse pair per line: {"source", "reference", "book",
"chapter", "verse"}. Both pairs share every cleaning, filtering and splitting rule; only the
steps written for one source text's quirks differ. docs/DATA.md explains every rule and the
resulting counts.

    python scripts/prepare_data.py [--pair {es-en,kjv-web,all}] [--out data] [--sword-path /usr/share/sword]
"""
import argparse
import dataclasses
import functools
import html
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

SPANISH_MODULE = "spaRV1909eb"
ENGLISH_MODULE = "engWEB2015eb"
KJV_MODULE = "engKJV2006eb"
DEBIAN_PACKAGES = {SPANISH_MODULE: "sword-text-sparv", ENGLISH_MODULE: "sword-text-web", KJV_MODULE: "sword-text-kjv"}
DEFAULT_SWORD_PATH = os.environ.get("SWORD_PATH", "/usr/share/sword")


def install_help(modules) -> str:
    return ("Install the Bible modules and the pysword reader with:\n"
            f"  apt-get install {' '.join(DEBIAN_PACKAGES[name] for name in modules)}\n"
            "  pip install pysword")


# Whole books per split (OSIS ids), so that parallel passages cannot leak between splits.
TEST_BOOKS = ("Ruth", "Esth", "Jonah", "Phil", "Jas", "1John")
# Dev: ~1,000 pairs of the same mix as test (Hebrew prophecy and poetry, NT letters).
DEV_BOOKS = ("Lam", "Joel", "Amos", "Mic", "Hab", "Hag",
             "Col", "1Thess", "2Thess", "Titus", "Phlm", "1Pet", "2John", "3John", "Jude")
RESERVED_BOOKS = ("Mark",)  # held out of every split, for a final unseen check

# Filters against misaligned pairs, chosen from the data (see docs/DATA.md).
MAX_VERSE_CHARS = 1000  # the longest real verse has 575 chars; the WEB glossary, 17,000
MAX_LENGTH_RATIO = 2.0  # a side over 2x longer than the corpus's median source/reference ratio implies


# --- cleaning, shared by every module ------------------------------------------------

# Elements dropped with their content: footnotes and cross-references, Song of Songs
# speaker headings, and editorial titles (the KJV's subscriptions to Paul's letters among
# them). Canonical titles (the psalm superscriptions) are scripture; RV1909 prints them
# inside verse 1, so the WEB's and the KJV's stay in verse 1 too.
DROPPED_ELEMENTS = re.compile(
    r'<note\b.*?</note>|<speaker\b.*?</speaker>|<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S
)
# Inline markup that sits inside a word run (Strong's numbers, keywords, names): removing
# it must not add a space ("¡<w>OH</w>" -> "¡OH"). Every other tag is a boundary: line,
# paragraph and quote tags often replace the space ("believed.”</q>His servant").
INLINE_TAGS = re.compile(r"</?(?:w|seg|name)\b[^>]*>")


def clean_osis(text: str, fix_markup: Optional[Callable[[str], str]] = None) -> str:
    """OSIS verse markup -> plain text: notes dropped, tags stripped, words never glued.

    fix_markup repairs one module's own markup quirks (space_rv1909_added_words,
    fix_kjv_markup). It sees the markup once the inline tags are gone, before anything
    else is dropped.
    """
    text = INLINE_TAGS.sub("", text)
    if fix_markup:
        text = fix_markup(text)
    text = DROPPED_ELEMENTS.sub(" ", text)
    text = re.sub(r"<[^>]*>", " ", text)
    text = html.unescape(text)
    text = " ".join(text.split())
    # Tags turned into spaces can land next to punctuation; the texts themselves never
    # put a space before closing or after opening punctuation, so removing these is safe.
    text = re.sub(r" (?=[,.;:!?)\]”’»])", "", text)
    text = re.sub(r"(?<=[(\[“‘¿¡«]) ", "", text)
    return text


# --- Reina-Valera 1909 (spaRV1909eb) only ------------------------------------------------

# RV1909 words added by the translators (printed in italics) lost their surrounding spaces
# in this module: "allí<tc>también</tc>bdelio". A clitic pronoun glued after a verb is
# an enclitic and belongs to it ("sáca<tc>lo</tc>" -> "sácalo"), except after the
# non-verbs below, the only ones this happens after in the module.
TRANS_CHANGE = re.compile(r"(\w?)<transChange\b[^>]*>(.*?)</transChange>(?=(\w?))", re.S)
CLITICS = {"lo", "la", "los", "las", "le", "les", "me", "te", "se", "nos", "os"}
NOT_VERBS = {"no", "y", "que", "como", "os", "ellos", "gentes", "cuánto", "dios", "jehová", "josué"}


def _space_trans_change(m: re.Match) -> str:
    before, added, after = m.groups()
    previous_word = re.search(r"\w*$", m.string[: m.end(1)]).group()
    enclitic = added in CLITICS and previous_word.lower() not in NOT_VERBS
    return before + (" " if before and not enclitic else "") + added + (" " if after else "")


def space_rv1909_added_words(text: str) -> str:
    """RV1909's markup fix for clean_osis: spaces back around the words added in italics."""
    return TRANS_CHANGE.sub(_space_trans_change, text)


# RV1909 appends to Paul's letters the KJV-style subscription ("Amén. Escrita de Roma á los
# Efesios por Tichîco."), a later scribal note the WEB does not translate.
SUBSCRIPTION = re.compile(r"(?<=Amén\.) .*\b(?:[Ee]scrita|[Ee]nviada)\b.*$")
# A run of all-caps words of two letters or more, maybe after a one-letter one ("A TI").
CAPITALS_RUN = re.compile(r"(?:\b[A-ZÁÉÍÓÚÑ] )?\b[A-ZÁÉÍÓÚÑÜ]{2,}\b(?: \b[A-ZÁÉÍÓÚÑÜ]{2,}\b)*")


def undo_rv1909_typesetting(verses: dict) -> dict:
    """Remove the subscriptions and the capitals RV1909 prints at the start of each chapter.

    A chapter opens with its first word(s) in capitals ("EN el principio", "Y FUÉ que",
    "HE AQUÍ"). Each such word gets the casing it has most often elsewhere in the text
    ("EN" -> "en", "JEHOVÁ" -> "Jehová"), and the run's first word a capital.
    """
    all_words = (word for text in verses.values() for word in re.findall(r"\w+", text))
    casing = Counter(word for word in all_words if not word.isupper())
    usual = {}
    for word, _ in casing.most_common():
        usual.setdefault(word.lower(), word)
    fixed = {}
    for (book, chapter, verse), text in verses.items():
        text = SUBSCRIPTION.sub("", text)
        if verse == 1:
            run = CAPITALS_RUN.search(text)
            if run:
                words = [usual.get(w.lower(), w.lower()) for w in run.group().split(" ")]
                words[0] = words[0][0].upper() + words[0][1:]
                text = text[: run.start()] + " ".join(words) + text[run.end():]
        fixed[(book, chapter, verse)] = text
    return fixed


# --- King James Version (engKJV2006eb) only ---------------------------------------------

# The KJV's markup needs no spacing repair: its italic words (<transChange>), Strong's
# numbers, red letters (<q who="Jesus">) and divine names (<divineName>LORD) all sit
# between spaces. Its subscriptions to Paul's letters are editorial <title>s, dropped
# like any other. What remains is typography and conversion leftovers:
#   - the pilcrows (¶) that open a paragraph: a paragraph mark, not a word;
#   - the ligatures æ and Æ (Cæsar, Æneas): the WEB spells them ae and Ae, and the shared
#     tokenizer has no piece for æ (it reads "Cæsar" as "C<unk>sar");
#   - 27 USFM markers "\nd" (divine name) left unconverted before a LORD ("the \nd LORD");
#   - the square brackets of 1 John 2:23 ("[but] he that acknowledgeth the Son"), the
#     1769 text's mark for words of uncertain source: the WEB has the clause, unmarked;
#   - the headings of Psalm 119's stanzas, <title><foreign>ב BETH.</foreign></title>: not
#     canonical titles in this module, but the WEB and RV1909 print them as verse text
#     ("BETH How can a young man…", "BETH. ¿Con qué…"), so the KJV's are kept too ("BETH.").
ACROSTIC_HEADING = re.compile(r"<title>\s*<foreign>[\u05d0-\u05ea]+ ([A-Z]+\.)</foreign>\s*</title>")
KJV_TYPOGRAPHY = str.maketrans({"¶": " ", "æ": "ae", "Æ": "Ae", "[": "", "]": ""})


def fix_kjv_markup(text: str) -> str:
    """The KJV's markup fix for clean_osis: Psalm 119's headings kept, typography and USFM leftovers undone."""
    text = ACROSTIC_HEADING.sub(r" \1 ", text)
    text = re.sub(r"\\nd\b", " ", text)
    return text.translate(KJV_TYPOGRAPHY)


# --- reading ----------------------------------------------------------------------------


def open_bibles(sword_path: str, modules=(SPANISH_MODULE, ENGLISH_MODULE)) -> tuple:
    """One pysword bible per module name; exits with install instructions if anything is missing."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        sys.exit(f"prepare_data: the pysword package is missing. {install_help(modules)}")
    if not os.path.isdir(os.path.join(sword_path, "mods.d")):
        sys.exit(f"prepare_data: no SWORD library at {sword_path} (it has no mods.d/ folder). "
                 f"{install_help(modules)}\nIf they are installed elsewhere, pass --sword-path or set SWORD_PATH.")
    library = SwordModules(sword_path)
    found = library.parse_modules()
    missing = [name for name in modules if name not in found]
    if missing:
        sys.exit(f"prepare_data: SWORD module {' and '.join(missing)} not found in {sword_path}. "
                 f"{install_help(missing)}")
    bibles = []
    for name in modules:
        bible = library.get_bible_from_module(name)
        # pysword decompresses a whole book again for every verse it reads; caching the
        # decompressed books makes reading a module take a second instead of a minute.
        bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
        bibles.append(bible)
    return tuple(bibles)


def read_verses(bible, fix_markup: Optional[Callable[[str], str]] = None) -> dict:
    """{(book, chapter, verse): cleaned text} for every non-empty verse, in canonical order.

    Each module is read in its own versification (RV1909 and the KJV: KJV, WEB: NRSVA);
    pairs are then matched on the (book, chapter, verse) key.
    """
    verses = {}
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            texts = bible.get_iter(books=book.osis_name, clean=False)  # one per verse slot
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                for verse in range(1, n_verses + 1):
                    text = clean_osis(next(texts), fix_markup)
                    if text:
                        verses[(book.osis_name, chapter, verse)] = text
    return verses


@dataclasses.dataclass(frozen=True)
class Pair:
    """A source text, its reference, where the pair is written, and the source's own steps."""
    source_module: str
    reference_module: str
    folder: str  # under --out
    fix_markup: Optional[Callable[[str], str]] = None  # the source's markup quirks, for clean_osis
    fix_verses: Optional[Callable[[dict], dict]] = None  # the source's typesetting, over all its verses


PAIRS = {
    "es-en": Pair(SPANISH_MODULE, ENGLISH_MODULE, "", space_rv1909_added_words, undo_rv1909_typesetting),
    "kjv-web": Pair(KJV_MODULE, ENGLISH_MODULE, "kjv-web", fix_kjv_markup),
}


def read_corpus(source_bible, reference_bible, pair: str = "es-en") -> tuple:
    """(source, reference): each {(book, chapter, verse): text}, cleaned and normalised.

    The WEB's deuterocanonical books, which RV1909 and the KJV lack, are left out.
    """
    steps = PAIRS[pair]
    source = read_verses(source_bible, steps.fix_markup)
    if steps.fix_verses:
        source = steps.fix_verses(source)
    books = {book for book, _, _ in source}
    reference = {key: text for key, text in read_verses(reference_bible).items() if key[0] in books}
    return source, reference


# --- pairing and filtering --------------------------------------------------------------


def align(source: dict, reference: dict) -> list:
    """Verse pairs present in both texts, in the source's canonical order."""
    return [
        {"source": text, "reference": reference[key], "book": key[0], "chapter": key[1], "verse": key[2]}
        for key, text in source.items()
        if key in reference
    ]


def _key(pair: dict) -> tuple:
    return pair["book"], pair["chapter"], pair["verse"]


DROP_RULES = ("too_long", "verse_count", "length_ratio", "shifted_stretch")


def median_length_ratio(pairs: list) -> float:
    """The median source/reference length ratio, in characters: the corpus's own yardstick."""
    return statistics.median(len(pair["source"]) / len(pair["reference"]) for pair in pairs)


def find_misaligned(pairs: list, source: dict, reference: dict) -> dict:
    """{(book, chapter, verse): rule} for pairs whose two sides are probably not the same verse.

    DROP_RULES, in order (a pair is counted under the first that flags it):
      too_long         a side over MAX_VERSE_CHARS: the WEB glossary appended to Rev 22:21.
      verse_count      the chapter has a different number of non-empty verses in the two
                       texts. The next chapter goes too: where the source follows the Hebrew
                       chapter division (RV1909's Num 13:1 is the WEB's Num 12:16), every
                       verse of that next chapter is shifted by one.
      length_ratio     one side over MAX_LENGTH_RATIO times longer than the corpus's median
                       length ratio implies: a verse divided differently (1Sam 15:24-25) or
                       words one text lacks (1 John 5:7).
      shifted_stretch  verses between two length_ratio pairs of one chapter: the source
                       divides that stretch differently, so all of it is shifted by a
                       verse (1Chr 21:15-30, 1Kgs 22:43-53 in RV1909).
    """
    flagged = {}
    for pair in pairs:
        if max(len(pair["source"]), len(pair["reference"])) > MAX_VERSE_CHARS:
            flagged[_key(pair)] = "too_long"

    source_counts = Counter((book, chapter) for book, chapter, _ in source)
    reference_counts = Counter((book, chapter) for book, chapter, _ in reference)
    bad_chapters = set()
    for book, chapter in source_counts | reference_counts:
        if source_counts[(book, chapter)] != reference_counts[(book, chapter)]:
            bad_chapters |= {(book, chapter), (book, chapter + 1)}
    for pair in pairs:
        if (pair["book"], pair["chapter"]) in bad_chapters:
            flagged.setdefault(_key(pair), "verse_count")

    ratios = {_key(pair): len(pair["source"]) / len(pair["reference"]) for pair in pairs}
    median = median_length_ratio(pairs)
    outliers = {}  # (book, chapter) -> verse numbers
    for key, ratio in ratios.items():
        if not 1 / MAX_LENGTH_RATIO <= ratio / median <= MAX_LENGTH_RATIO:
            flagged.setdefault(key, "length_ratio")
            outliers.setdefault(key[:2], []).append(key[2])
    for key in ratios:
        verses = outliers.get(key[:2], [])
        if verses and min(verses) < key[2] < max(verses):
            flagged.setdefault(key, "shifted_stretch")
    return flagged


def split(pairs: list) -> dict:
    """{"train", "dev", "test"} lists of pairs, by whole book; RESERVED_BOOKS go nowhere."""
    splits = {"train": [], "dev": [], "test": []}
    for pair in pairs:
        if pair["book"] in RESERVED_BOOKS:
            continue
        name = "test" if pair["book"] in TEST_BOOKS else "dev" if pair["book"] in DEV_BOOKS else "train"
        splits[name].append(pair)
    return splits


def write_jsonl(path: Path, pairs: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


def copy_bleu(pairs: list) -> float:
    """Corpus BLEU (sacrebleu's defaults) of the sources copied as the output: the floor a model must beat."""
    import sacrebleu
    return sacrebleu.corpus_bleu([pair["source"] for pair in pairs], [[pair["reference"] for pair in pairs]]).score


def build(name: str, source: dict, reference: dict, out: Path) -> dict:
    """Pair, filter and split one corpus (read_corpus's output), write the splits into
    out/PAIRS[name].folder, print the counts docs/DATA.md gives; returns the splits."""
    steps = PAIRS[name]
    pairs = align(source, reference)
    print(f"{name}: non-empty verses: {len(source)} {steps.source_module}, {len(reference)} {steps.reference_module}; "
          f"verse pairs: {len(pairs)}; median length ratio: {median_length_ratio(pairs):.3f}")

    flagged = find_misaligned(pairs, source, reference)
    dropped = Counter(flagged.values())
    for rule in DROP_RULES:
        print(f"  dropped by {rule}: {dropped[rule]}")
    kept = [pair for pair in pairs if _key(pair) not in flagged]
    reserved = sum(pair["book"] in RESERVED_BOOKS for pair in kept)
    print(f"  held out ({', '.join(RESERVED_BOOKS)}): {reserved}")

    folder = out / steps.folder
    folder.mkdir(parents=True, exist_ok=True)
    splits = split(kept)
    for split_name, rows in splits.items():
        write_jsonl(folder / f"{split_name}.jsonl", rows)
        n_books = len({pair["book"] for pair in rows})
        bleu = "" if split_name == "train" else f"; the source copied scores {copy_bleu(rows):.2f} BLEU"
        print(f"  {split_name}: {len(rows)} pairs from {n_books} books -> {folder / split_name}.jsonl{bleu}")
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=[*PAIRS, "all"], default="es-en",
                        help="es-en: Spanish->English, into OUT/ (the default); kjv-web: King James->WEB, "
                             "into OUT/kjv-web/; all: both")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--sword-path", default=DEFAULT_SWORD_PATH,
                        help="SWORD library holding mods.d/ (default: $SWORD_PATH or /usr/share/sword)")
    args = parser.parse_args()
    start = time.time()

    names = list(PAIRS) if args.pair == "all" else [args.pair]
    modules = list(dict.fromkeys(module for name in names
                                 for module in (PAIRS[name].source_module, PAIRS[name].reference_module)))
    bibles = dict(zip(modules, open_bibles(args.sword_path, modules)))
    for name in names:
        corpus = read_corpus(bibles[PAIRS[name].source_module], bibles[PAIRS[name].reference_module], name)
        build(name, *corpus, args.out)
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
