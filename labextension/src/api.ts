import { ServerConnection } from '@jupyterlab/services';

import { apiBase } from './model';

/** A one-line, user-facing failure (the service's own message when it sent one). */
export class ApiError extends Error {}

/**
 * The REST API through JupyterLab's ServerConnection: XSRF and the Jupyter token for the embedded service,
 * cookies for a Hub service, or a lomas token that is sent only to the configured service URL (ServerConnection
 * puts the settings' token in the Authorization header).
 */
export class LomasApi {
  constructor(
    private serviceUrl: string,
    private token: string
  ) {}

  configure(serviceUrl: string, token: string): void {
    this.serviceUrl = serviceUrl;
    this.token = token;
  }

  get remote(): boolean {
    return this.serviceUrl.trim() !== '';
  }

  /** `body` is sent as JSON, or as it is when it is bytes (an upload's chunk). */
  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const defaults = ServerConnection.makeSettings();
    const settings = this.remote
      ? ServerConnection.makeSettings({ baseUrl: this.serviceUrl, token: this.token, appendToken: false })
      : defaults;
    const url = apiBase(this.serviceUrl, defaults.baseUrl) + path;
    const init: RequestInit = { method };
    if (body instanceof Uint8Array) {
      init.body = body;
      init.headers = { 'Content-Type': 'application/octet-stream' };
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, settings);
    } catch {
      throw new ApiError('the DP service cannot be reached');
    }
    const text = await response.text();
    let data: any = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const message = data && typeof data.message === 'string' ? data.message : `HTTP ${response.status}`;
      throw new ApiError(message);
    }
    return data as T;
  }
}
