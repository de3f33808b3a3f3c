/** A built-in mask name, or a function from the plaintext to what may be shown. */
export type Mask = 'email' | 'phone' | 'last4' | 'full' | ((value: unknown) => string);

/**
 * Masks a value for logs and support screens:
 * - `email`: first character of the local part and the top-level domain (`j***@***.com`);
 * - `phone`: only the last two digits (`*** *** **42`);
 * - `last4`: only the last four characters (`****1234`);
 * - `full`: nothing (`****`).
 */
export function maskValue(value: unknown, mask: Mask = 'full'): string | null {
  if (value === null || value === undefined) return null;
  if (typeof mask === 'function') return mask(value);
  const text = typeof value === 'string' ? value : String(value);
  switch (mask) {
    case 'email': {
      const at = text.lastIndexOf('@');
      if (at < 1) return '****';
      const tld = text
        .slice(at + 1)
        .split('.')
        .pop();
      return `${text[0]}***@***${tld && tld !== text.slice(at + 1) ? `.${tld}` : ''}`;
    }
    case 'phone': {
      const digits = text.replace(/\D/g, '');
      return digits.length < 6 ? '****' : `*** *** **${digits.slice(-2)}`;
    }
    case 'last4':
      return text.length <= 4 ? '****' : `****${text.slice(-4)}`;
    default:
      return '****';
  }
}
