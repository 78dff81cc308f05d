"""Build the Spanish->English verse-aligned Bible corpus used to train and evaluate minibild.

Source: Reina-Valera 1909 (SWORD module spaRV1909eb). Reference: World English Bible
(engWEB2015eb). Both are public domain. Writes data/{train,dev,test}.jsonl, one verse pair
per line: {"source", "reference", "book", "chapter", "verse"}. docs/DATA.md explains every
cleaning and filtering rule and the resulting counts.

    python scripts/prepare_data.py [--out data] [--sword-path /usr/share/sword]
"""
import argparse
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

SPANISH_MODULE = "spaRV1909eb"  # Debian package sword-text-sparv
ENGLISH_MODULE = "engWEB2015eb"  # Debian package sword-text-web
DEFAULT_SWORD_PATH = os.environ.get("SWORD_PATH", "/usr/share/sword")
INSTALL_HELP = (
    "Install the two Bible modules and the pysword reader with:\n"
    "  apt-get install sword-text-sparv sword-text-web\n"
    "  pip install pysword"
)

# Whole books per split (OSIS ids), so that parallel passages cannot leak between splits.
TEST_BOOKS = ("Ruth", "Esth", "Jonah", "Phil", "Jas", "1John")
# Dev: ~1,000 pairs of the same mix as test (Hebrew prophecy and poetry, NT letters).
DEV_BOOKS = ("Lam", "Joel", "Amos", "Mic", "Hab", "Hag",
             "Col", "1Thess", "2Thess", "Titus", "Phlm", "1Pet", "2John", "3John", "Jude")
RESERVED_BOOKS = ("Mark",)  # held out of every split, for a final unseen check

# Filters against misaligned pairs, chosen from the data (see docs/DATA.md).
MAX_VERSE_CHARS = 1000  # the longest real verse has 575 chars; the WEB glossary, 17,000
MAX_LENGTH_RATIO = 2.0  # a side over 2x longer than the median Spanish/English ratio implies


# --- cleaning ---------------------------------------------------------------------------

# Elements dropped with their content: footnotes and cross-references, Song of Songs
# speaker headings, and editorial titles. Canonical titles (the psalm superscriptions)
# are scripture; RV1909 prints them inside verse 1, so the WEB's stay in verse 1 too.
DROPPED_ELEMENTS = re.compile(
    r'<note\b.*?</note>|<speaker\b.*?</speaker>|<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S
)
# Inline markup that sits inside a word run (Strong's numbers, keywords, names): removing
# it must not add a space ("¡<w>OH</w>" -> "¡OH"). Every other tag is a boundary: line,
# paragraph and quote tags often replace the space ("believed.”</q>His servant").
INLINE_TAGS = re.compile(r"</?(?:w|seg|name)\b[^>]*>")
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


def clean_osis(text: str) -> str:
    """OSIS verse markup -> plain text: notes dropped, tags stripped, words never glued."""
    text = DROPPED_ELEMENTS.sub(" ", text)
    text = INLINE_TAGS.sub("", text)
    text = TRANS_CHANGE.sub(_space_trans_change, text)
    text = re.sub(r"<[^>]*>", " ", text)
    text = html.unescape(text)
    text = " ".join(text.split())
    # Tags turned into spaces can land next to punctuation; the texts themselves never
    # put a space before closing or after opening punctuation, so removing these is safe.
    text = re.sub(r" (?=[,.;:!?)\]”’»])", "", text)
    text = re.sub(r"(?<=[(\[“‘¿¡«]) ", "", text)
    return text


# --- reading ----------------------------------------------------------------------------


def open_bibles(sword_path: str):
    """(Spanish, English) pysword bibles; exits with install instructions if anything is missing."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        sys.exit(f"prepare_data: the pysword package is missing. {INSTALL_HELP}")
    if not os.path.isdir(os.path.join(sword_path, "mods.d")):
        sys.exit(f"prepare_data: no SWORD library at {sword_path} (it has no mods.d/ folder). {INSTALL_HELP}\n"
                 "If they are installed elsewhere, pass --sword-path or set SWORD_PATH.")
    modules = SwordModules(sword_path)
    found = modules.parse_modules()
    missing = [name for name in (SPANISH_MODULE, ENGLISH_MODULE) if name not in found]
    if missing:
        sys.exit(f"prepare_data: SWORD module {' and '.join(missing)} not found in {sword_path}. {INSTALL_HELP}")
    bibles = []
    for name in (SPANISH_MODULE, ENGLISH_MODULE):
        bible = modules.get_bible_from_module(name)
        # pysword decompresses a whole book again for every verse it reads; caching the
        # decompressed books makes reading a module take a second instead of a minute.
        bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
        bibles.append(bible)
    return tuple(bibles)


def read_verses(bible) -> dict:
    """{(book, chapter, verse): cleaned text} for every non-empty verse, in canonical order.

    Each module is read in its own versification (RV1909: KJV, WEB: NRSVA); pairs are then
    matched on the (book, chapter, verse) key.
    """
    verses = {}
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            texts = bible.get_iter(books=book.osis_name, clean=False)  # one per verse slot
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                for verse in range(1, n_verses + 1):
                    text = clean_osis(next(texts))
                    if text:
                        verses[(book.osis_name, chapter, verse)] = text
    return verses


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


def read_corpus(spanish_bible, english_bible) -> tuple:
    """(spanish, english): each {(book, chapter, verse): text}, cleaned and normalised.

    The WEB's deuterocanonical books, which RV1909 lacks, are left out.
    """
    spanish = undo_rv1909_typesetting(read_verses(spanish_bible))
    books = {book for book, _, _ in spanish}
    english = {key: text for key, text in read_verses(english_bible).items() if key[0] in books}
    return spanish, english


# --- pairing and filtering --------------------------------------------------------------


def align(spanish: dict, english: dict) -> list:
    """Verse pairs present in both texts, in the Spanish canonical order."""
    return [
        {"source": text, "reference": english[key], "book": key[0], "chapter": key[1], "verse": key[2]}
        for key, text in spanish.items()
        if key in english
    ]


def _key(pair: dict) -> tuple:
    return pair["book"], pair["chapter"], pair["verse"]


DROP_RULES = ("too_long", "verse_count", "length_ratio", "shifted_stretch")


def find_misaligned(pairs: list, spanish: dict, english: dict) -> dict:
    """{(book, chapter, verse): rule} for pairs whose two sides are probably not the same verse.

    DROP_RULES, in order (a pair is counted under the first that flags it):
      too_long         a side over MAX_VERSE_CHARS: the WEB glossary appended to Rev 22:21.
      verse_count      the chapter has a different number of non-empty verses in the two
                       texts. The next chapter goes too: where RV1909 follows the Hebrew
                       chapter division (its Num 13:1 is the WEB's Num 12:16), every verse
                       of that next chapter is shifted by one.
      length_ratio     one side over MAX_LENGTH_RATIO times longer than the median pair
                       implies: a verse divided differently (1Sam 15:24-25) or words one
                       text lacks (1 John 5:7).
      shifted_stretch  verses between two length_ratio pairs of one chapter: RV1909
                       divides that stretch differently, so all of it is shifted by a
                       verse (1Chr 21:15-30, 1Kgs 22:43-53).
    """
    flagged = {}
    for pair in pairs:
        if max(len(pair["source"]), len(pair["reference"])) > MAX_VERSE_CHARS:
            flagged[_key(pair)] = "too_long"

    spanish_counts = Counter((book, chapter) for book, chapter, _ in spanish)
    english_counts = Counter((book, chapter) for book, chapter, _ in english)
    bad_chapters = set()
    for book, chapter in spanish_counts | english_counts:
        if spanish_counts[(book, chapter)] != english_counts[(book, chapter)]:
            bad_chapters |= {(book, chapter), (book, chapter + 1)}
    for pair in pairs:
        if (pair["book"], pair["chapter"]) in bad_chapters:
            flagged.setdefault(_key(pair), "verse_count")

    ratios = {_key(pair): len(pair["source"]) / len(pair["reference"]) for pair in pairs}
    median = statistics.median(ratios.values())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--sword-path", default=DEFAULT_SWORD_PATH,
                        help="SWORD library holding mods.d/ (default: $SWORD_PATH or /usr/share/sword)")
    args = parser.parse_args()
    start = time.time()

    spanish_bible, english_bible = open_bibles(args.sword_path)
    spanish, english = read_corpus(spanish_bible, english_bible)
    pairs = align(spanish, english)
    print(f"non-empty verses: {len(spanish)} Spanish, {len(english)} English; verse pairs: {len(pairs)}")

    flagged = find_misaligned(pairs, spanish, english)
    dropped = Counter(flagged.values())
    for rule in DROP_RULES:
        print(f"  dropped by {rule}: {dropped[rule]}")
    kept = [pair for pair in pairs if _key(pair) not in flagged]
    reserved = sum(pair["book"] in RESERVED_BOOKS for pair in kept)
    print(f"  held out ({', '.join(RESERVED_BOOKS)}): {reserved}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in split(kept).items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
        n_books = len({pair["book"] for pair in rows})
        print(f"{name}: {len(rows)} pairs from {n_books} books -> {args.out / name}.jsonl")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
