"""A labelled corpus for the secret detector: secrets in many phrasings and formats, and harmless personal facts
that look close to them. Deterministic (a seeded generator), so every run measures the same texts.

    corpus() -> list[Example]      (text, is_secret, kind) — kind names the family, for the per-kind table

Credential values are random strings in each issuer's documented shape (prefix, length, alphabet), made here:
none is a real key. Obfuscations a model or a user produces are applied to some of them: a zero-width space or
joiner, a soft hyphen, fullwidth letters (NFKC folds them back), a BOM, spacing around separators.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from proxy.sensitive import luhn_valid

SEED = 17


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    secret: bool
    kind: str


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    """A `length`-digit number starting with `prefix` whose last digit makes the Luhn sum right."""
    digits = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(digits + check for check in string.digits if luhn_valid(digits + check))


def luhn_broken(prefix: str, length: int, rng: random.Random) -> str:
    good = luhn_complete(prefix, length, rng)
    return good[:-1] + str((int(good[-1]) + 1 + rng.randrange(9)) % 10)


def group(number: str, sizes: tuple[int, ...], sep: str) -> str:
    parts, start = [], 0
    for size in sizes:
        parts.append(number[start:start + size])
        start += size
    return sep.join(parts)


def rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"
HEX = "0123456789abcdef"
URLSAFE = ALNUM + "-_"


def credential_values(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, value) in the shapes the issuers document."""
    return [
        ("openai", "sk-" + rand(rng, ALNUM, 48)),
        ("openai", "sk-proj-" + rand(rng, URLSAFE, 74) + "T3BlbkFJ" + rand(rng, URLSAFE, 74)),
        ("openai", "sk-svcacct-" + rand(rng, URLSAFE, 58)),
        ("anthropic", "sk-ant-api03-" + rand(rng, URLSAFE, 93) + "AA"),
        ("aws-key-id", "AKIA" + rand(rng, string.ascii_uppercase + "234567", 16)),
        ("aws-key-id", "ASIA" + rand(rng, string.ascii_uppercase + "234567", 16)),
        ("github", "ghp_" + rand(rng, ALNUM, 36)),
        ("github", "gho_" + rand(rng, ALNUM, 36)),
        ("github", "github_pat_" + rand(rng, ALNUM, 22) + "_" + rand(rng, ALNUM, 59)),
        ("gitlab", "glpat-" + rand(rng, URLSAFE, 20)),
        ("slack", "xoxb-" + rand(rng, string.digits, 12) + "-" + rand(rng, string.digits, 13) + "-"
         + rand(rng, ALNUM, 24)),
        ("slack", "xoxp-" + rand(rng, string.digits, 12) + "-" + rand(rng, string.digits, 12) + "-"
         + rand(rng, string.digits, 13) + "-" + rand(rng, HEX, 32)),
        ("slack-webhook", "https://hooks.slack.com/services/T" + rand(rng, string.ascii_uppercase + string.digits, 8)
         + "/B" + rand(rng, string.ascii_uppercase + string.digits, 10) + "/" + rand(rng, ALNUM, 24)),
        ("stripe", "sk_live_" + rand(rng, ALNUM, 24)),
        ("stripe", "rk_live_" + rand(rng, ALNUM, 24)),
        ("google", "AIza" + rand(rng, URLSAFE, 35)),
        ("jwt", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ" + rand(rng, URLSAFE, 40) + "." + rand(rng, URLSAFE, 43)),
        ("huggingface", "hf_" + rand(rng, string.ascii_letters, 34)),
        ("npm", "npm_" + rand(rng, ALNUM, 36)),
        ("pypi", "pypi-AgEIcHlwaS5vcmc" + rand(rng, URLSAFE, 60)),
        ("twilio", "SK" + rand(rng, HEX, 32)),
        ("sendgrid", "SG." + rand(rng, URLSAFE, 22) + "." + rand(rng, URLSAFE, 43)),
        ("telegram", rand(rng, string.digits, 10) + ":AA" + rand(rng, URLSAFE, 33)),
        ("digitalocean", "dop_v1_" + rand(rng, HEX, 64)),
        ("groq", "gsk_" + rand(rng, ALNUM, 52)),
        ("shopify", "shpat_" + rand(rng, HEX, 32)),
        ("mailchimp", rand(rng, HEX, 32) + "-us" + str(rng.randrange(1, 20))),
        ("private-key", "-----BEGIN RSA PRIVATE KEY----- MIIEpAIBAAKCAQEA" + rand(rng, B64, 40)),
        ("private-key", "-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAA" + rand(rng, B64, 30)),
    ]


ACCOUNTS = ["mail", "Gmail", "bank", "Netflix", "Amazon", "work laptop", "Wi-Fi", "router", "PayPal", "Steam",
            "Facebook", "online banking", "VPN", "iCloud", "school portal"]
PASSWORDS_SIMPLE = ["tulip-42", "hunter2", "Sunshine!2024", "correcthorse", "blue-Moon-77", "P@ssw0rd!",
                    "qwerty123", "m0nkey_business", "Lisbon1999", "dragon#88", "snoopy42", "Tr0ub4dor&3"]
PEOPLE = [("User", "the user's", "their"), ("Alice", "Alice's", "her"), ("Bob", "Bob's", "his"),
          ("The user", "the user's", "their")]


def password_statements(rng: random.Random) -> list[str]:
    templates = [
        "{W}'s password for the {a} account is {p}",
        "{p} is {wp} {a} password",
        "{W} uses {p} as the password for {a}",
        "The password to {wp} {a} is {p}",
        "{a} password: {p}",
        "{a} pw = {p}",
        "{W} set the {a} password to {p}",
        "{W} changed {pp} {a} password to {p}",
        "{W} logs into {a} with username {u} and password {p}",
        "{Wp} {a} credentials are {u}:{p}",
        "Remember: {a} pass {p}",
        "{W} told me the {a} password, it's {p}",
        "{p} — that's {wp} {a} password",
        "{W}'s {a} login is {u} / password {p}",
        "{W} wants me to remember the {a} password ({p})",
        "Password for {a}: \"{p}\"",
        "{W}'s {a} passcode is {p}",
        "{Wp} {a} password was updated, the new one is {p}",
        "the {a} password is {p} (capital first letter)",
        "{W} keeps {pp} {a} password simple: {p}",
    ]
    foreign = [
        "Le mot de passe de {a} est {p}", "Son mot de passe {a} : {p}", "La contraseña de {a} es {p}",
        "{p} es la contraseña del banco", "Das Passwort für {a} ist {p}", "Kennwort für {a}: {p}",
        "A senha do {a} é {p}", "La password di {a} è {p}", "Het wachtwoord van {a} is {p}",
        "Il mio mot de passe pour {a} c'est {p}", "Mi clave de {a} es {p}", "Hasło do {a} to {p}",
    ]
    out = []
    for template in templates + foreign:
        for _ in range(2):
            who, whose, pronoun = rng.choice(PEOPLE)
            out.append(template.format(W=who, Wp=whose.capitalize(), wp=whose, pp=pronoun, a=rng.choice(ACCOUNTS),
                                       p=rng.choice(PASSWORDS_SIMPLE), u=rng.choice(["alice", "bob77", "a.smith"])))
    out += [
        "User's password for the mail account is tulip-42", "tulip-42 is the user's bank password",
        "The Wi-Fi passphrase is 'correct horse battery staple'",
        "User's passphrase for the password manager is 'purple monkey dishwasher'",
        "The answer to the user's security question is Fluffy",
        "Security answer for the bank: mother's maiden name Smith",
    ]
    return out


def pin_statements(rng: random.Random) -> list[str]:
    templates = [
        "the user's PIN code is {n}", "PIN for the debit card is {n}", "{Wp} bank card PIN: {n}", "{n} is {wp} PIN",
        "ATM pin {n}", "the door code is {n}#", "the alarm code is {n}", "garage code {n}",
        "phone unlock code is {n}{m}", "passcode {n}", "SIM PIN {n}", "PUK code {n}{m}{m}",
        "code PIN de la carte : {n}", "El PIN de la tarjeta es {n}", "Geheimzahl der Bankkarte: {n}",
        "{W}'s card PIN number is {n}", "the PIN to {wp} phone is {n}", "{W} unlocks the laptop with PIN {n}",
        "the code for the building entrance is {n}", "the combination of the safe is {n}",
        "the padlock combination is {a}-{b}-{c}", "{W}'s CVV is {cvv}", "card security code {cvv}",
    ]
    out = []
    for template in templates:
        for _ in range(2):
            who, whose, _pronoun = rng.choice(PEOPLE)
            out.append(template.format(W=who, Wp=whose.capitalize(), wp=whose, n=rand(rng, string.digits, 4),
                                       m=rand(rng, string.digits, 2), a=rng.randrange(10, 40),
                                       b=rng.randrange(10, 40), c=rng.randrange(10, 40),
                                       cvv=rand(rng, string.digits, 3)))
    return out


def card_statements(rng: random.Random) -> list[str]:
    templates = ["card number {c}", "{Wp} Visa is {c} exp 04/27", "{W} pays with {c}", "credit card: {c}",
                 "the company card is {c}", "Kartennummer {c}", "{c} is {wp} Mastercard", "numéro de carte {c}"]
    separators = [" ", "-", ".", "/", "", " - ", "_", "\u00a0", "·"]
    out = []
    for i in range(48):
        amex = i % 6 == 5
        number = luhn_complete(rng.choice(["34", "37"]), 15, rng) if amex else \
            luhn_complete(rng.choice(["4", "51", "55", "2221", "6011"]), 16, rng)
        sizes = (4, 6, 5) if amex else (4, 4, 4, 4)
        who, whose, _pronoun = rng.choice(PEOPLE)
        out.append(rng.choice(templates).format(c=group(number, sizes, separators[i % len(separators)]),
                                                W=who, Wp=whose.capitalize(), wp=whose))
    return out


def credential_statements(rng: random.Random) -> list[str]:
    phrasings = ["My {k} key is {v}", "{W}'s API token: {v}", "use {v} for the deploy", "key={v}", "{v}",
                 "the {k} token is {v} — keep it safe", "{W} pasted {v} into the chat"]
    out = []
    for round_ in range(3):
        for kind, value in credential_values(rng):
            who, _whose, _pronoun = rng.choice(PEOPLE)
            text = rng.choice(phrasings).format(k=kind, v=value, W=who)
            out.append(obfuscate(text, value, round_, rng))
    aws_secret = [
        "aws secret access key {s}", "aws_secret_access_key = {s}", "AWS secret: {s}", "{W}'s AWS secret key is {s}",
        "AWS_SECRET_ACCESS_KEY={s}", "the secret access key for the prod account is {s}",
    ]
    for template in aws_secret:
        for _ in range(2):
            who, _whose, _pronoun = rng.choice(PEOPLE)
            out.append(template.format(s=rand(rng, B64, 40), W=who))
    generic = [
        "API key: {h}", "the api key for the weather service is {h}", "token = {r}", "{W}'s access token is {r}",
        "client secret {r}", "secret key: {r}", "Bearer {r}", "Authorization: Bearer {r}", "app secret is {h}",
        "postgres://{u}:{r}@db.internal:5432/app", "mongodb+srv://{u}:{r}@cluster0.mongodb.net/",
        "redis://:{r}@cache:6379", "https://{u}:{r}@example.com/private", "DefaultEndpointsProtocol=https;"
        "AccountName=acct;AccountKey={b}==",
    ]
    for template in generic:
        for _ in range(2):
            who, _whose, _pronoun = rng.choice(PEOPLE)
            out.append(template.format(h=rand(rng, HEX, 32), r=rand(rng, ALNUM, 28), b=rand(rng, B64, 86), W=who,
                                       u=rng.choice(["admin", "app", "alice"])))
    return out


def obfuscate(text: str, value: str, round_: int, rng: random.Random) -> str:
    """Round 0 as it is; round 1 with an invisible character inside the value; round 2 with fullwidth letters."""
    if round_ == 0 or len(value) < 8:
        return text
    cut = rng.randrange(4, len(value) - 2)
    if round_ == 1:
        mark = rng.choice(["\u200b", "\u200d", "\u00ad", "\u2060", "\ufeff", "\u200c"])
        return text.replace(value, value[:cut] + mark + value[cut:])
    wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in value[:cut])
    return text.replace(value, wide + value[cut:])


def harmless(rng: random.Random) -> list[str]:
    """Personal facts that share words, numbers or shapes with secrets and are not secrets."""
    numbers = [
        "my favourite number is {n}", "User's house number is {n}", "User was born in {y}",
        "User walks {n} steps before breakfast", "User's zip code is {z}", "User's flight is BA {n}",
        "User stayed in room {n}", "User takes bus line {s}", "User's lucky numbers are 4, 8, 15, 16, 23 and 42",
        "User has {n} followers on Mastodon", "User's employee number is E{n}", "User ran 10 km in {s}:{t} minutes",
        "User's phone ends in {n}", "User's car is a {y} model", "User's PIN pad at the shop was broken in {y}",
        "User paid {n} euros for the bike", "User's order number is {o}", "User's tracking number is {trk}",
        "User's ISBN of the favourite book is 978-{s}-{n}-{t}-1", "User's anniversary is {s}/{t}/{y}",
        "User's grandmother turned {s} in {y}", "User's office is on floor {s}, desk {n}",
        "User's library card expires in {y}", "User scored {n} points at bowling", "User's bike lock is red",
        "User's WiFi network is called tulip-{s}", "User's dog is named Hunter", "User's apartment is {n}B",
    ]
    topics = [
        "User works on password managers", "User forgot their password last week",
        "User reset the bank password yesterday", "User hates password rules at work",
        "User's password manager is Bitwarden", "User wants to change all passwords this weekend",
        "User prefers passkeys over passwords", "The password field on the user's bank site is broken",
        "User asked how to make a strong password", "User teaches a course on password security",
        "User's company requires 12-character passwords", "User uses a different password for every site",
        "User thinks password hints are useless", "User got locked out after three wrong passwords",
        "User keeps passwords in 1Password", "User writes the PIN reminder letters at the bank",
        "User uses Pinterest for recipes", "User pinned the tweet about the marathon", "User likes pine forests",
        "User loves Pinot noir", "User's keys are always on the hook by the door", "User bakes key lime pie",
        "User studies token ring networks", "User collects subway tokens", "User is learning about JWT auth",
        "User has an AWS certification", "User works at sk-tech, a startup", "User's GitHub username is octocat",
        "User likes Slack more than Teams", "User uses Stripe for the online shop", "User's API rotates every 90 days",
        "User's area code is 415", "The dress code at the user's office is casual", "User learns Morse code",
        "User writes code in Rust", "User does code reviews on Fridays", "User's secret talent is juggling",
        "User keeps a secret diary", "User's secret recipe uses cardamom", "User's favourite band is The Keys",
        "User's security badge is blue", "User works in cyber security", "User lost the car keys in Porto",
        "User's mother's name is Maria", "User's pet is called Fluffy", "User's first school was in Lyon",
        "Il a oublié son mot de passe", "Sie hat ihr Passwort vergessen", "Olvidó su contraseña otra vez",
        "User's access badge works on floors 3 to 5", "User is building a token-based auth system",
        "User manages the API keys rotation policy", "User's private key ceremony is on Monday",
        "User gave a talk about secret scanning", "User's code name at work is Falcon",
        "User uses the passphrase approach recommended by EFF", "User's token of appreciation was a mug",
        "User prefers the Visa card over the Mastercard", "User's card game night is on Thursdays",
        "User's credit card was declined in Berlin", "User's bank card expires next year",
        "User's phone PIN was reset by the shop", "User's CVV was stolen once, so they use virtual cards",
        "User's safe word for the kids is a secret", "User's locker is number 42",
        "User ran the 'passwords' workshop at school", "User's key card opens the lab",
        "User works for AWS in Dublin", "User's Slack handle is @alice", "User's favourite song is 'Secret'",
        "User's password is easy to forget, so they use a manager", "User never shares passwords with anyone",
        "User asked for the router's admin page address", "User changed the router password after the move",
        "User's bank sends a one-time code by SMS", "User's two-factor app is Aegis", "User's PIN is not stored here",
        "User wants a reminder to rotate the API key on Monday", "User's token budget for GPT-4 is 8000",
        "User's secret Santa is Bob", "User's pass for the museum is annual", "User has a bus pass",
        "User passed the driving test in 2019", "User's passport expires in 2030",
        "User's boarding pass is on the phone",
        "User's key takeaway from the talk was patience", "User plays the piano in the key of D",
        "User's hotel key card stopped working", "User's card reader at home is a Nitrokey",
        "User uses YubiKeys for work", "User keeps the spare key with the neighbour",
        "User's company uses Okta for single sign-on", "User's login name on the forum is tulip",
        "User's username is bob77", "User's e-mail signature says 'Cheers'", "User's code of conduct talk went well",
        "User is a keynote speaker in June", "User's secret garden has roses", "User said the credentials page is slow",
        "User's certificate expires in May", "User's private school was in Geneva",
        "User's access to the lab starts at 8",
        "User's auth server runs on port 8443", "User's encryption course starts next week",
        "User's hash browns recipe uses butter", "User's sk8 park is on Elm street", "User's ghp collection is large",
        "User bought shares of AKIA Corp", "User's bearer bonds story is a family legend",
        "User's gate opens with a remote", "User's locker combination changed last month",
        "User's PIN-up poster collection is from the 50s", "User's pinball high score is 4 million",
        "User's kids use tokens at the arcade", "User's favourite number is 4821", "User's top score was 9999",
    ]
    out = list(topics)
    for template in numbers:
        for _ in range(4):
            out.append(template.format(n=rand(rng, string.digits, 4), y=rng.randrange(1950, 2024),
                                       z=rand(rng, string.digits, 5), s=rng.randrange(10, 60), t=rng.randrange(10, 60),
                                       o=group(luhn_broken("4", 16, rng), (4, 4, 4, 4), rng.choice([" ", "-", "."])),
                                       trk="1Z" + rand(rng, string.ascii_uppercase + string.digits, 16)))
    prose_numbers = [
        "User's IBAN starts with PT50", "User's postcode is SW1A 1AA", "User is 1.82 m tall",
        "User's grandfather was born on 12.04.1931", "User's train leaves at 07:45 from platform 9",
        "User has version 4.8.2.1 of the app", "User's blood type is O+", "User's IP at home is 192.168.1.20",
        "User's shoe size is 43", "User's marathon time was 3:45:10", "User's student number is 20231234",
        "User lives at 221B Baker Street", "User called the support line 0800 123 456",
        "User's colour is #3A7BD5", "User's Discord name is alice#1234", "User's chess rating is 1820",
    ]
    return out + prose_numbers


def held_out(rng: random.Random) -> tuple[list[str], list[str]]:
    """(secrets, harmless) written after the rules were tuned on the rest, as a blind check. Its first run
    measured recall 0.750 with 0.0% harmless refused; the rule families its misses exposed (codes "to get into
    the office", Wi-Fi and recovery keys, German "lautet", a quoted value after "password") were then fixed, so
    it is no longer blind: a new blind set is the next honest measurement."""
    visa = group(luhn_complete("4539", 16, rng), (4, 4, 4, 4), " ")
    secrets = [
        "Her online banking PIN has been 7391 since 2019", "Bob's laptop unlock password = Wint3r!sComing",
        "remember that the password for the garage app is 'opensesame'", "Netflix: login bob@example.com pw flamingo88",
        "The code to get into the office is 5521", "My debit card's PIN? It's 0073",
        "Store this: github token ghp_" + rand(rng, ALNUM, 36), "OPENAI_API_KEY=sk-" + rand(rng, ALNUM, 48),
        "the key for the OpenAI account: sk-proj-" + rand(rng, URLSAFE, 60),
        "AWS creds: AKIA" + rand(rng, string.ascii_uppercase + "234567", 16) + " / " + rand(rng, B64, 40),
        f"card {visa}, expiry 09/28, CVC 318", "Visa ending 4242, full number 4242424242424242",
        "User's Amex: 3714 496353 98431", "password for wifi -> BlueSky2023", "The user's iPhone passcode: 908172",
        "Das WLAN-Passwort lautet Sonnenblume77", "Mot de passe Gmail: Chaton!2020", "La clave del wifi es gatito2021",
        "the router admin password is admin1234", "User's Steam password: MyDogRex!",
        "Slack bot token xoxb-" + rand(rng, string.digits, 12) + "-" + rand(rng, string.digits, 13) + "-"
        + rand(rng, ALNUM, 24), "The HF token hf_" + rand(rng, string.ascii_letters, 34),
        "user's SSH private key begins -----BEGIN OPENSSH PRIVATE KEY-----",
        "Database URL: mysql://root:Sup3rS3cret@10.0.0.5/shop", "Use password 'tulip-42' for the shared drive",
        "PIN: 8821 (bank of america)", "Her voicemail PIN is 2580", "the safe code is 19-07-85",
        "The security code on the back of the card is 771", "mother's maiden name (security answer): Kowalski",
        "bank password? p4ssw0rd, same as always", "Login for the school portal — user: ana, password: Escola#2024",
        "The Wi-Fi key is 8F3K-29LM-QQ71", "API secret for Binance: " + rand(rng, ALNUM, 64),
        "Stripe secret key sk_live_" + rand(rng, ALNUM, 24), "the user's 2FA backup codes are 8271-6252, 1938-2831",
        "One-time recovery code: 4HJ2-KK81-PQ9Z", "The alarm disarm code is 4-3-2-1",
        "Password is the dog's name followed by 99: Rex99", "Alice's phone PIN is 1 9 8 4",
    ]
    harmless = [
        "User changed jobs in 2021 and now works at Stripe", "User's favourite pasta shape is number 7 spaghetti",
        "User's PIN-protected diary is in the drawer", "User gets the password reset e-mails too often",
        "User's sister is called Pinar", "User has 4821 unread e-mails", "User's phone model is Pixel 8 Pro",
        "User's kid's school code of conduct is strict", "User's bike has a 3-digit combination lock",
        "User's wedding was on 2015-06-20", "User's football jersey number is 10",
        "User's grandmother's recipe is a family secret", "User wants to learn how passkeys replace passwords",
        "User's Wi-Fi is slow in the kitchen", "User's locker at the gym is 112", "User's modem is a Fritz!Box 7590",
        "User's exam grade was 18/20", "User is allergic to penicillin", "User's API design book is by Arnaud Lauret",
        "User keeps a spare house key at work", "User's license plate is 34-AB-56", "User's IBAN bank is Millennium",
        "The user's bank account was opened in 2012", "User's credit score is 780",
        "User's PIN was changed by the bank after the fraud",
        "User's password policy at work forces changes every 90 days", "User's secret santa budget is 20 euros",
        "User's favourite Pokémon is number 25", "User scored 1450 on the SAT",
        "User's train ticket reference is QX7P2M", "User's Git commit style uses conventional commits",
        "User's security guard job starts at 22:00", "User's cat is called Token", "User's birthday is 3 March 1990",
        "User's house is number 1984 on the road", "User plays chess at 1600 Elo",
        "User's flight confirmation code is K9XL2Q", "User's new phone number is on the fridge",
        "User asked what 'sk-' means in API keys", "User's password hint is the name of the first pet",
    ]
    return secrets, harmless


def blind_set(rng: random.Random) -> tuple[list[str], list[str]]:
    """(secrets, harmless) written after the second set's fixes, as a second blind check. Its first run measured
    recall 0.733 with 0.0% harmless refused; the families its misses exposed ("login: admin / Qwerty!234" pairs,
    "became", ATM and multi-word code names, French door codes, the key of a named Wi-Fi network, wallet seed
    phrases) were then fixed, so it is no longer blind either."""
    secrets = [
        "Bob's Instagram password? It's sunflower88", "remember my laptop login: admin / Qwerty!234",
        "the gym locker code is 3391", "My bank PIN, just so you know, is 6612", "pw for the NAS is n4s-b0x!",
        "Her Spotify account password became Melody#12 last week", "The garage door opener code: 7720",
        "Alice's ATM code is 9041", "wifi at grandma's: network Casa, key ola12345", "PIN of the work badge is 5008",
        "Set the Discord password to 'purplecat77' please remember", "The passcode for my phone is 142536",
        "Das Passwort lautet jetzt Sommer2024!", "Le code de la porte d'entrée est 4B19",
        "Contraseña del correo: Gato_2020", "card: 5425 2334 3010 9903", "Visa 4000 0566 5566 5556 exp 11/26",
        "amex 3782-822463-10005", "OpenAI key: sk-" + rand(rng, ALNUM, 48),
        "ANTHROPIC_API_KEY=sk-ant-api03-" + rand(rng, URLSAFE, 90),
        "github token: github_pat_" + rand(rng, ALNUM, 22) + "_" + rand(rng, ALNUM, 59),
        "the AWS key pair is AKIA" + rand(rng, string.ascii_uppercase + "234567", 16) + " and secret "
        + rand(rng, B64, 40), "My Twitter login is @bob with password bobrocks", "The iPad unlock PIN is 0000",
        "Security question answer: first car was a Fiat", "Bob shared his Netflix creds: bob@mail.com / Netfl1x!",
        "The alarm system master code is 84-21-09", "Her online banking passcode: 77aa88bb",
        "recovery phrase: apple banana cherry dog elephant fish grape house igloo jam kite lemon",
        "Database password = hunter2-prod",
    ]
    harmless = [
        "User's password manager subscription renews in May", "User asked me to remind them to change passwords",
        "User's PIN number was reissued by the bank last month", "User's door code changed, they will tell us later",
        "User bought a 4-digit combination lock for the bike", "User's favourite film is 'The Da Vinci Code'",
        "User's locker is next to the door", "User's recovery from the surgery took 6 weeks",
        "User's secret to good bread is patience", "User's key ring has 7 keys",
        "User's credit card limit is 2000 euros", "User's bank is open until 16:00", "User's phone is an iPhone 13",
        "User's Wi-Fi router is in the hallway", "User works as a locksmith",
        "User's token collection includes 1920s coins", "User's access to the building is from 7 to 19",
        "User's safe deposit box is at the main branch", "User's son is learning about passwords at school",
        "User's alarm goes off at 6:45", "User's GitHub profile has 300 stars",
        "User's API usage last month was 1.2 million tokens", "User's bus pass costs 40 euros a month",
        "User's pin badge collection has 120 pins", "User's card collection includes a 1952 Topps",
        "User's password is never stored by the assistant", "User's security clearance is level 2",
        "User uses the same email for work and home", "User's apartment code of conduct forbids pets",
        "User's four kids are 4, 8, 2 and 1 years old",
    ]
    return secrets, harmless


def corpus() -> list[Example]:
    rng = random.Random(SEED)
    secrets = ([Example(t, True, "password") for t in password_statements(rng)]
               + [Example(t, True, "pin-code") for t in pin_statements(rng)]
               + [Example(t, True, "card") for t in card_statements(rng)]
               + [Example(t, True, "credential") for t in credential_statements(rng)])
    plain = [Example(t, False, "harmless") for t in harmless(rng)]
    for kind, make, seed in (("second set", held_out, SEED + 1), ("third set", blind_set, SEED + 2)):
        kept_secrets, kept_harmless = make(random.Random(seed))
        secrets += [Example(t, True, kind) for t in kept_secrets]
        plain += [Example(t, False, kind) for t in kept_harmless]
    seen: set[str] = set()
    unique = []
    for example in secrets + plain:
        if example.text not in seen:
            seen.add(example.text)
            unique.append(example)
    return unique


if __name__ == "__main__":
    examples = corpus()
    print(f"{sum(e.secret for e in examples)} secrets, {sum(not e.secret for e in examples)} harmless")
