"""The MM1 paper's evaluation metrics, computed as the official scripts compute them.

- Captions: CIDEr-D and BLEU-4 from pycocoevalcap's own scorers (`coco_caption_scores`), on
  captions tokenised by `ptb_tokenize`, a pure-Python copy of the Java tokeniser pycocoevalcap
  runs, so no Java is needed.
- VQA: the accuracy of the official VQA evaluation (vqaEval.py), with its answer normalisation
  (`vqa_accuracy`).
- Multiple choice: exact match on the choice's text or letter (`multiple_choice_correct`).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

# ---------------------------------------------------------------------------------------------
# PTB tokenisation, as pycocoevalcap's PTBTokenizer does it
# ---------------------------------------------------------------------------------------------
#
# pycocoevalcap writes the captions one per line and runs Stanford CoreNLP 3.4.1's
# `edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` over them (Java), then drops
# the tokens in PUNCTUATIONS. That tokeniser is a JFlex lexer, PTBLexer: at each position the rule
# matching the longest text wins (a rule's trailing context, JFlex's `r1/r2`, counts towards the
# length but is not consumed), the earlier rule on a tie, and the rule's action makes the token.
# `_RULES` are its rules in its order, reconstructed from the CoreNLP sources of the time and
# checked against the 3.4.1 jar pycocoevalcap ships. Rules whose tokens differ only in a period
# that is dropped anyway (sentence-final abbreviations repeat their period) are merged.

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after tokenisation. The comparison is
# case-sensitive and the tokens were lower-cased first, so "-lrb-" (from "(") stays in.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                "-", "--", "...", ";"}


def _bmp_class(test: Callable[[str], bool]) -> str:
    """The Basic Multilingual Plane characters passing `test`, as the inside of a regex class:
    JFlex's [:letter:] is Java's Character.isLetter over the BMP (str.isalpha here)."""
    ranges, start = [], None
    for cp in range(0x10001):
        inside = cp < 0x10000 and test(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\u{start:04x}" + (f"-\\u{cp - 1:04x}" if cp - 1 > start else ""))
            start = None
    return "".join(ranges)


# The lexer is caseless except inside character classes: (?i:...) marks its caseless literals.
L = f"[{_bmp_class(str.isalpha)}]"  # a letter
LD = rf"(?:{L}|\d)"
# Marks and modifiers the lexer also counts as letters (soft hyphen, combining accents, ...).
LETTER_EXTRA = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384"
    r"\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F"
    r"\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E"
    r"\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1"
    r"\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983"
    r"\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F"
    r"\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03"
    r"\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD"
)
LETTER = rf"(?:{L}|&[aeiouAEIOU](?i:acute|grave|uml);|[{LETTER_EXTRA}])"
WORD = rf"{LETTER}(?:{LETTER}|\d)*(?:[.!?]{LETTER}(?:{LETTER}|\d)*)*"  # also "file.jpg", "a.b"
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSETC = rf"(?:{APOS}|[`\u0091\u2018\u201B])"
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"  # a word before n't: "do" of "don't"
SREDAUX = rf"(?i:n){APOSETC}(?i:t)"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
SPACENL = rf"(?:{SPACE}|\r|\n|[\u2028\u2029\u000B\u000C\u0085])"
INSENTP = r"[,;:\u3001]"
HYPHEN = r"[-_\u058A\u2010\u2011]"
# Python's alternation takes the first alternative that matches where JFlex takes the longest:
# alternatives that can be prefixes of each other are ordered longest first.
ACRO2 = (r"(?i:U\.S\.-(?:U\.K|U\.S\.S\.R))|(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)"
         r"|[A-Za-z](?:\.[A-Za-z])+")
ACRO = rf"{ACRO2}|[A-Za-z]"
# Abbreviations keep their period ("st.", "mr.", "u.s.", "a."). These lists were found by running
# the jar; a capital in (?-i:...) is required ("Mass." but "mass" "."). ABBREV1 ones (months,
# states, firms) also win against a word glued on ("Inc.Foo" -> "inc." "foo").
ABBREV1 = (
    r"(?i:(?:(?:Ed|Ph)\.D|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs"
    r"|Fri|Ala|Ariz|(?-i:A)z|(?-i:A)rk|Calif|Colo|Conn|Ct|Dak|(?-i:D)el|Fla|Ga|(?-i:I)ll|Ind|Kans?"
    r"|Ky|(?-i:L)a|(?-i:M)ass|Md|Mich|Minn|(?-i:M)iss|Mo|Mont|Neb|Nev|Okla|(?-i:O)re|(?-i:P)a|Penn"
    r"|Tenn|(?-i:T)ex|Va|Vt|(?-i:W)ash|Wisc?|Wyo|Inc|Cos?|Corp|Pp?t(?-i:[ye])s?|Ltd|Plc|Rt"
    r"|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros|Blvd|Rd|Esq|etc|al|seq|Bldg)\.)"
)
ABBREV2 = (
    rf"(?:{ACRO}|(?i:Mrs?|Ms|(?-i:M)iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm"
    r"|Rev|Maj|Sgt|Cpl|Pvt|Mt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Ft|Adj"
    r"|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|Dept|Ph|ft|Invt|Elec|Natl|M(?-i:[ft])g|vs|Alex"
    r"|Wm|Jos|Cie|cf|TREAS|a\.k\.a))\."
)
ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|pp|op)\."  # these keep their period before a number only
# After a one-letter "acronym" ("z."), these words (capitalised) or a tag mean a new sentence.
SENTENCE_START = (
    r"A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
    r"|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)"
    r"|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)"
    r"|Y(?i:et|ou)"
)
NUMBER = r"[-+]?(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
THING = rf"(?:[dDoOlL]{APOSETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{LD})?{LD}+)*"
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:(?:{ACRO2})\.|[A-Za-z0-9\u00AD]+))+"
THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"  # AT&T, but b & w
SGML = (r"<(?:[!?][A-Za-z-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*"
        r"(?:[ ]*=[ ]*['\"][^\r\n'\"]*['\"])?|['\"][^\r\n'\"]*['\"]|[ ]*/))*[ ]*/?)>")
PHONE = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00A0])?[0-9]{2,4}[- \u00A0])"
         r"[0-9]{3,4}[- \u00A0]?[0-9]{3,5}"
         r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
NOT_URL = r" \t\n\f\r\"<>|"
LIKELYURL = (
    rf"(?:(?i:www)\.(?:[^{NOT_URL}.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}"
    # ",-_" is a range in the original's class too: it leaves out digits and capitals.
    rf"|(?:[^{NOT_URL}`'.!?(){{}},-_$]+\.)+(?i:com|net|org|edu))"
    rf"(?:/[^{NOT_URL}()]+[^{NOT_URL}.!?(){{}},-])?"
)
SMILEY = r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]"
ASIANSMILEY = (r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)"
               r"|\([\^x=~<>']-[\^x=~<>'`]\)")
MISCSYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE"
    r"\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A"
    r"\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF"
    r"\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)


def _soft(text: str) -> str:
    """Soft hyphens are dropped (a lone one stays a hyphen)."""
    return text.replace("\u00AD", "") or "-"


def _quotes(text: str, left: bool) -> str:
    """LaTeX-style quotes, as PTB3: ` `` opening, ' '' closing ones."""
    text = re.sub(r"&apos;|'", "`" if left else "'", text)
    text = re.sub(r'"|&quot;', "``" if left else "''", text)
    text = re.sub("[\u0091\u2018\u201B\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203A]", "'", text)
    text = re.sub("[\u0093\u201C\u00AB]", "``", text)
    return re.sub("[\u0094\u201D\u00BB]", "''", text)


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _raw(text: str) -> str:
    return text


def _amp(text: str) -> str:
    return re.sub("(?i)&amp;", "&", text)


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00A0")


def _const(token: Optional[str]) -> Callable[[str], Optional[str]]:
    return lambda text: token


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}


def _rule(main: str, emit: Callable[[str], Optional[str]], context: str = "", pushback: int = 0):
    """A lexer rule: `emit` makes the token from the text matching `main`; `context` is the
    trailing context JFlex writes `main/context` (counted in the match's length, not consumed);
    `pushback` characters of the match are read again (JFlex's yypushback: "cannot" gives "can",
    then "not")."""
    return re.compile(rf"(?P<m>{main})(?=(?P<c>{context}))"), emit, pushback


_RULES = [  # PTBLexer's rules in its order; emit returns the token (None for nothing)
    _rule(r"(?i:c\+\+|[cf]#)", _raw),
    _rule(r"(?i:cannot|'twas)", lambda t: t[:-3], pushback=3),  # "can" "not", "'t" "was"
    _rule(r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", lambda t: t[:-2], pushback=2),  # "gon" "na"
    _rule(SGML, _nbsp),
    _rule(r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _const("--")),
    _rule("(?i:&amp;)", _const("&")),
    _rule(r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", _raw),
    _rule(WORD, _soft, REDAUX),
    _rule(SWORD, _soft, SREDAUX),
    _rule(WORD, _soft),
    # words with an apostrophe inside (APOWORD): 'n', l', 'em, o'neil, '90s, 'till, y'all, ...
    _rule(rf"{APOS}(?i:n){APOS}?", _raw),
    _rule(rf"[lLdDjJ]{APOS}", _raw),
    _rule(rf"(?i:Dunkin|somethin|ol){APOS}", _raw),
    _rule(rf"{APOS}(?i:em)", _raw),
    _rule(rf"[A-HJ-XZn]{APOSETC}{L}{{2,}}", _raw),
    _rule(rf"{APOS}[2-9]0(?i:s)", _raw),
    _rule(rf"{APOS}(?i:till?)", _raw),
    _rule(rf"{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*", _raw),
    _rule(rf"{APOS}(?i:cause)", _raw),
    _rule(r"(?i:cont'd)\.?", _raw),
    _rule(r"(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", _raw),
    _rule(rf"(?i:y){APOS}", _raw, L),
    _rule(rf"(?i:https?://)[^{NOT_URL}()]+[^{NOT_URL}.!?(){{}},-]", _raw),
    _rule(LIKELYURL, _raw),
    _rule(rf"(?:<|(?i:&lt;))?[a-zA-Z0-9][^{NOT_URL}(){{}}\u00A0]*@(?:[^{NOT_URL}(){{}}.\u00A0]+\.)*"
          rf"[^{NOT_URL}(){{}}.\u00A0]+(?:>|(?i:&gt;))?", _raw),  # e-mail addresses
    _rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", _raw),  # Twitter names and hashtags
    _rule(REDAUX, lambda t: _quotes(t, False), "[^A-Za-z]"),
    _rule(SREDAUX, lambda t: _quotes(t, False)),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", _raw),  # dates
    _rule(NUMBER, _soft),
    _rule(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", _raw),
    _rule(r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", _nbsp),  # fractions: "5 1/2"
    _rule(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", lambda t: _FRACTIONS.get(t, t)),
    _rule(rf"(?i:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"
          rf"|Cap{APOS}n|c{APOS}est)", _amp),
    _rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _raw),
    _rule(r"[A-Z]*\$|#", _raw),
    _rule("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
          lambda t: _CURRENCY.get(t, t)),
    # "z. The" is "z" "." (a one-letter acronym ends a sentence); "U.S. The": "u.s." ".".
    _rule(rf"(?:{ACRO})\.", lambda t: t[:-1] if len(t) == 2 else t,
          rf"{SPACENL}+(?:{SENTENCE_START}|{SGML}){SPACENL}", pushback=1),
    _rule(ABBREV3, _raw, rf"{SPACENL}?\d"),
    _rule(ABBREV1, _raw, r"[\s\S]{2}"),
    _rule(ABBREV1, _raw),
    _rule(ABBREV2, _raw),
    _rule(rf"{APOS}[0-9][0-9]", _raw, SPACENL),  # '99
    _rule(rf"{WORD}\.", _soft, INSENTP),
    _rule(PHONE, lambda t: _parens(_nbsp(t))),
    _rule(r'"|(?i:&quot;)', lambda t: _quotes(t, True), "[A-Za-z0-9$]"),
    _rule(r'"|(?i:&quot;)', lambda t: _quotes(t, False)),
    _rule("<|(?i:&lt;)", _const("<")),
    _rule(">|(?i:&gt;)", _const(">")),
    _rule(SMILEY, _parens, "[^A-Za-z0-9]"),
    _rule(ASIANSMILEY, _parens),
    _rule(r"\{", _const("-LCB-")),
    _rule(r"\}", _const("-RCB-")),
    _rule(r"\[", _const("-LSB-")),
    _rule(r"\]", _const("-RSB-")),
    _rule(r"\(", _const("-LRB-")),
    _rule(r"\)", _const("-RRB-")),
    _rule(r"-+", lambda t: "--" if 3 <= len(t) <= 4 else t),
    _rule(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", _const("...")),
    _rule(r"@+|#+|_+|\*+|(?:\\\*){1,3}", _raw),
    _rule(rf"{INSENTP}|[?!]+|[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002=/]", _raw),
    _rule(rf"{HTHING}\.", _soft, INSENTP),
    _rule(HTHING, _soft),
    _rule(rf"{THING}\.", _raw, INSENTP),
    _rule(THING, _raw),
    _rule(rf"{THINGA}\.", _amp, INSENTP),
    _rule(THINGA, _amp),
    _rule("'", lambda t: _quotes(t, True), r"[A-Za-z][^ \t\n\r\u00A0]"),
    _rule(REDAUX, lambda t: _quotes(t, False)),
    _rule(rf"''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}}|{APOS}",
          lambda t: _quotes(t, False)),
    _rule("<<|>>", _raw),
    _rule(MISCSYMBOL, _raw),
    # Spaces and the characters it cannot tokenise: no token.
    _rule(rf"\x00|{SPACE}+|[\u200B\u200E\u200F\uFEFF]|{SPACENL}|(?i:&nbsp;)|.", _const(None)),
]
# Most tokens are plain words followed by spaces, or by one of .,;:!? and spaces: there no rule
# matches longer (bar the splits of "cannot", "gonna"... and abbreviations), so none is tried.
_PLAIN_WORD = re.compile(r"([A-Za-z]+)([.,;:!?]?)(?=[ \t\n]|\Z)[ \t]*")
_NOT_PLAIN = re.compile(rf"(?i:cannot|gonna|gotta|lemme|gimme|wanna)|{ABBREV1}|{ABBREV2}|{ABBREV3}")
# Line breaks inside a caption: pycocoevalcap makes "\n" a space; Java would start a new line at
# the others, putting every later caption on the wrong image.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\u000B\u000C]")


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Tokenise captions as pycocoevalcap's PTBTokenizer does, each to its tokens joined by
    spaces: "A man's dog, (grey) can't jump!" -> "a man 's dog -lrb- grey -rrb- ca n't jump".

    Like pycocoevalcap, it reads the captions as the lines of one text, through Stanford
    CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase), and drops the PUNCTUATIONS tokens:
    a few rules look past the end of a line ("z." before "The" on the next one is "z" "."), so
    pass a batch as pycocoevalcap does (all references, or all predictions, in image order).

    Known differences from the Java tokeniser (none for ordinary English captions):
    - Line breaks inside a caption (\\r, U+2028, U+2029, U+000B, U+000C) are spaces here.
      pycocoevalcap only replaces "\\n"; Java starts a new line at the others, which moves
      every later caption of the batch onto the wrong image (a pycocoevalcap bug, not copied).
    - Letters and digits are Python's Unicode tables (str.isalpha, \\d) rather than Java 7's:
      characters added to Unicode since may tokenise differently. Characters outside the Basic
      Multilingual Plane (emoji, ...) are dropped, as Java drops them.
    - JFlex takes the longest of a rule's alternatives, Python's regular expressions the first
      that matches: the alternatives are ordered to agree, and the rules were checked against
      the jar on ordinary and unusual captions, but exotic text (runs of symbols, URLs, SGML
      tags, phone numbers) may still tokenise differently.
    """
    if not captions:
        return []
    text = "\n".join(_LINE_BREAKS.sub(" ", c) for c in captions)
    lines, tokens, pos = [], [], 0
    while pos < len(text):
        if text[pos] == "\n":
            lines.append(tokens)
            tokens, pos = [], pos + 1
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and not (_NOT_PLAIN.fullmatch(plain[1]) or
                          plain[2] == "." and _NOT_PLAIN.fullmatch(plain[1] + ".")):
            tokens.append(plain[1])  # its mark, if any, is one of PUNCTUATIONS
            pos = plain.end()
            continue
        best, best_length = None, 0
        for rule in _RULES:
            m = rule[0].match(text, pos)
            if m and m.end("m") - pos + len(m["c"]) > best_length:
                best, best_length = (m, rule), m.end("m") - pos + len(m["c"])
        m, (_, emit, pushback) = best
        token = emit(m["m"])
        if token is not None:
            tokens.append(token)
        pos = m.end("m") - pushback
    lines.append(tokens)
    return [" ".join(w for w in " ".join(line).lower().rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in lines]


# ---------------------------------------------------------------------------------------------
# CIDEr-D and BLEU-4: pycocoevalcap's scorers
# ---------------------------------------------------------------------------------------------


def coco_caption_scores(candidates: list[str], references: list[list[str]]) -> tuple[dict, list[dict]]:
    """CIDEr-D and BLEU-4 of tokenised candidates (one per image) against tokenised references,
    by pycocoevalcap's Cider (n=4, sigma=6, document frequencies from these references, x10) and
    Bleu(4) (the "closest" reference length), as COCOEvalCap computes them. Returns the corpus
    scores and each image's."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    return ({"CIDEr": float(cider), "BLEU-4": float(bleu[3])},
            [{"CIDEr": float(c), "BLEU-4": float(b)} for c, b in zip(cider_each, bleu_each[3])])


# ---------------------------------------------------------------------------------------------
# VQA accuracy: the official evaluation (github.com/GT-Vision-Lab/VQA, vqaEval.py)
# ---------------------------------------------------------------------------------------------

VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                   "@", "`", ",", "?", "!"]
# Sic: "(?!<=\d)" is a look-ahead (a typo for a look-behind), so every "." not followed by a
# digit goes: "3.5" stays, "yes." and "a.m." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a punctuation mark next to a space, or any when the answer has
    a digit group comma ("10,000"), is deleted, otherwise it becomes a space ("yes/no" -> "yes no")."""
    out = text
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (32) as sub's third argument, the count: at most 32
    # periods go.
    return _PERIOD_STRIP.sub("", out, count=32)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words to digits ("two" -> "2"), articles
    dropped, apostrophe-less contractions restored ("dont" -> "don't")."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize_prediction(prediction: str) -> str:
    """A predicted answer as vqaEval compares it."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction, in [0, 1]: over the len(answers) ways of leaving one
    annotator's answer out, the mean of min(1, matching answers among the others / 3).

    As vqaEval does, the annotators' answers are only punctuation-processed, and only when they
    disagree: VQAv2's annotations are normalised already (lower case, digits).
    """
    predicted = vqa_normalize_prediction(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_process_punctuation(a) for a in answers]
    matches = [a == predicted for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(answers)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def choice_letter(index: int) -> str:
    """The letter a prompt labels choice `index` with: A, B, C, ..."""
    return chr(ord("A") + index)


def multiple_choice_correct(prediction: str, choices: list[str], answer: int) -> bool:
    """Whether a free-text prediction picks choice `answer`. After stripping and case-folding, it
    must be the choice's text ("a red car"), its letter alone ("B", "b)", "B.", "B:"), or start
    with the letter, ")" "." or ":" and a space ("B) a red car", "b. red"). Anything else, a bare
    letter followed by more text ("B red") included, is wrong."""
    text = prediction.strip().casefold()
    letter = choice_letter(answer).casefold()
    return (text == choices[answer].strip().casefold()
            or text in (letter, letter + ")", letter + ".", letter + ":")
            or any(text.startswith(letter + mark + " ") for mark in ").:"))
