// Display formatting. Tokens and money arrive as integers (paise, US cents, micro-dollars) and are
// formatted with BigInt arithmetic: no floating-point number ever holds an amount.

const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

/** 12345 -> "12,345" (grouping by thousands, whatever the browser's locale). */
export function tokens(n) {
  const v = BigInt(n);
  return (v < 0n ? "-" : "") + group((v < 0n ? -v : v).toString());
}

/** Tokens with a sign: "+10,000", "-2,000", "0". */
export function signedTokens(n) {
  return BigInt(n) > 0n ? "+" + tokens(n) : tokens(n);
}

/** An integer of minor units with `places` decimals: fixed(12345, 2) -> "123.45". */
export function fixed(minor, places) {
  let v = BigInt(minor);
  const negative = v < 0n;
  if (negative) v = -v;
  const base = 10n ** BigInt(places);
  const frac = places ? "." + (v % base).toString().padStart(places, "0") : "";
  return (negative ? "-" : "") + group((v / base).toString()) + frac;
}

export const inrPaise = (paise) => "₹" + fixed(paise, 2);
export const usdCents = (cents) => "$" + fixed(cents, 2);

/** Micro-dollars: cents from one dollar up; below, to a hundredth of a cent (LLM calls cost
 *  fractions of a cent). Rounded half up, in integers. */
export function usdMicros(micros) {
  const m = BigInt(micros);
  if (m >= 1_000_000n) return "$" + fixed((m + 5_000n) / 10_000n, 2);
  return "$" + fixed((m + 50n) / 100n, 4);
}

/** "2024-05-01T12:30:00" (UTC, as the API writes it) -> "2024-05-01 12:30". */
export function utcTime(iso) {
  return iso ? iso.replace("T", " ").slice(0, 16) : "";
}

/** The calendar day of a UTC timestamp: "2024-06-01T00:00:00" -> "2024-06-01". */
export const utcDay = (iso) => (iso ? iso.slice(0, 10) : "");

/** YYYY-MM-DD of `date` shifted by `days`, in UTC. */
export function dayKey(date, days = 0) {
  const d = new Date(Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), date.getUTCDate() + days));
  return d.toISOString().slice(0, 10);
}
