/**
 * The REST client of the pool: `ServerConnection` requests to `/singularity/api/...`.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type {
  IGpuTime,
  IKernelDetail,
  IMe,
  IPool,
  IQuota,
  IQuotas,
  ITimeline
} from './types';

/** What the pool model needs from the server; the tests give it a fake. */
export interface IPoolAPI {
  pool(): Promise<IPool>;
  quota(): Promise<IQuota>;
  me(): Promise<IMe>;
  kernel(kernelId: string): Promise<IKernelDetail>;
  offload(kernelId: string): Promise<IKernelDetail>;
  restore(kernelId: string): Promise<IKernelDetail>;
  pin(kernelId: string, pinned: boolean): Promise<IKernelDetail>;
  quotas(): Promise<IQuotas>;
  setQuotas(quotas: Record<string, unknown>): Promise<IQuotas>;
}

/** What the pool's pictures need from the server (the ledger's history); the tests give a fake. */
export interface IHistoryAPI {
  /** Leases and transfers between `since` and `until` (epoch seconds; at most 7 days). */
  timeline(since: number, until: number): Promise<ITimeline>;
  /** GPU time per day over the last `days` days (1 to 31). */
  gpuTime(days: number): Promise<IGpuTime>;
}

/**
 * An error the server answered: `message` is the server's own JSON `message`, ready to show.
 */
export class PoolAPIError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
    this.name = 'PoolAPIError';
  }
}

/**
 * The server's answer for a failed request, as words: its JSON `message` if it has one,
 * else the status line.
 */
export function messageFromBody(
  status: number,
  statusText: string,
  body: string
): string {
  if (body) {
    try {
      const data = JSON.parse(body);
      if (data && typeof data.message === 'string' && data.message) {
        return data.message;
      }
    } catch {
      // not JSON: an HTML error page, say
    }
  }
  if (status === 403) {
    return 'the server refused: permission denied';
  }
  if (status === 404) {
    return 'not found: is jupyter-singularity enabled on this server?';
  }
  return `the server answered ${status} ${statusText}`.trim();
}

/** Calls `/singularity/api/<endPoint>` with the lab's server settings (base URL, token, XSRF). */
export async function requestAPI<T>(
  endPoint: string,
  settings: ServerConnection.ISettings,
  init: RequestInit = {}
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'singularity', 'api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const body = await response.text();
  if (!response.ok) {
    throw new PoolAPIError(
      messageFromBody(response.status, response.statusText, body),
      response.status
    );
  }
  return (body ? JSON.parse(body) : null) as T;
}

/** The real client. */
export class PoolAPI implements IPoolAPI, IHistoryAPI {
  constructor(
    readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {}

  pool(): Promise<IPool> {
    return requestAPI<IPool>('pool', this.settings);
  }

  quota(): Promise<IQuota> {
    return requestAPI<IQuota>('quota', this.settings);
  }

  me(): Promise<IMe> {
    return requestAPI<IMe>('me', this.settings);
  }

  kernel(kernelId: string): Promise<IKernelDetail> {
    return requestAPI<IKernelDetail>(
      `kernels/${encodeURIComponent(kernelId)}`,
      this.settings
    );
  }

  offload(kernelId: string): Promise<IKernelDetail> {
    return this.action(kernelId, 'offload');
  }

  restore(kernelId: string): Promise<IKernelDetail> {
    return this.action(kernelId, 'restore');
  }

  pin(kernelId: string, pinned: boolean): Promise<IKernelDetail> {
    return this.action(kernelId, 'pin', { pinned });
  }

  quotas(): Promise<IQuotas> {
    return requestAPI<IQuotas>('quotas', this.settings);
  }

  setQuotas(quotas: Record<string, unknown>): Promise<IQuotas> {
    return requestAPI<IQuotas>('quotas', this.settings, {
      method: 'PUT',
      body: JSON.stringify(quotas)
    });
  }

  timeline(since: number, until: number): Promise<ITimeline> {
    const query = URLExt.objectToQueryString({ since, until });
    return requestAPI<ITimeline>(`timeline${query}`, this.settings);
  }

  gpuTime(days: number): Promise<IGpuTime> {
    return requestAPI<IGpuTime>(`gpu-time${URLExt.objectToQueryString({ days })}`, this.settings);
  }

  private action(
    kernelId: string,
    action: string,
    body: unknown = {}
  ): Promise<IKernelDetail> {
    return requestAPI<IKernelDetail>(
      `kernels/${encodeURIComponent(kernelId)}/${action}`,
      this.settings,
      { method: 'POST', body: JSON.stringify(body) }
    );
  }
}
