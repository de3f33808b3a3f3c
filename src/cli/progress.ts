import { MultiBar, Presets } from 'cli-progress';

/**
 * Progress bars on stderr, one per encrypted property, for long jobs. Silent when stderr is not a
 * terminal or when output is JSON, so scripts get clean output.
 */
export class Progress {
  readonly #bars = new Map<string, ReturnType<MultiBar['create']>>();
  readonly #multi: MultiBar | undefined;

  /** `unit`: what the counts count (`rows`, or `values` for a tenant job over several properties). */
  constructor(enabled: boolean, unit = 'rows') {
    this.#multi =
      enabled && process.stderr.isTTY
        ? new MultiBar(
            {
              format: ` {bar} {percentage}% | {value}/{total} ${unit} | {label}`,
              hideCursor: true,
              stream: process.stderr,
            },
            Presets.shades_classic,
          )
        : undefined;
  }

  update(label: string, done: number, total: number): void {
    if (!this.#multi) return;
    let bar = this.#bars.get(label);
    if (!bar) {
      bar = this.#multi.create(Math.max(total, 1), 0, { label });
      this.#bars.set(label, bar);
    }
    bar.setTotal(Math.max(total, done, 1));
    bar.update(done, { label });
  }

  stop(): void {
    this.#multi?.stop();
  }
}
